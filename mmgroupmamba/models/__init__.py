from .convert import convert_official_state_dict
from .groupmamba import GroupMamba, GroupMambaClassifier
from .classification import ClsDataPreprocessor, ImageClassifier, backbone_state_dict
from .distillation import FrozenTeacher, build_teacher
from .weights import NonFiniteWeightsError, WeightsMismatchError

__all__ = ['GroupMamba', 'GroupMambaClassifier', 'convert_official_state_dict']
__all__ += ['ClsDataPreprocessor', 'ImageClassifier', 'backbone_state_dict', 'FrozenTeacher',
            'build_teacher', 'NonFiniteWeightsError', 'WeightsMismatchError']
