# GroupMamba-B on ImageNet-1k, the recipe of gm_t_in1k.py (84.5 top-1 in the paper).
_base_ = ['./gm_t_in1k.py']

model = dict(classifier=dict(arch='base'))
