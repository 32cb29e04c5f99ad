from setuptools import find_packages, setup

setup(
    name='mmgroupmamba',
    version='0.1.0',
    description='GroupMamba backbones for MMDetection and MMSegmentation',
    packages=find_packages(include=['mmgroupmamba', 'mmgroupmamba.*']),
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.1',
        'torchvision',
        'timm',
        'mmengine==0.10.7',
        'mmcv==2.1.0',
        'mmdet==3.3.0',
        'mmsegmentation==1.2.2',
        'pycocotools',
        'setuptools>=77,<82',
    ],
    extras_require={
        'triton': ['triton'],
        'onnx': ['onnx', 'onnxruntime', 'onnxscript'],
        'tests': ['pytest', 'onnx', 'onnxruntime', 'onnxscript'],
    },
)
