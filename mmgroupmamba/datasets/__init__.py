from .imagenet import ImageNetFolder
from .transforms import LoadPILImage, PackClsInputs, TimmTransform
