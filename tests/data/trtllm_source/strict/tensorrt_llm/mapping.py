# Synthetic fixture (not TensorRT-LLM code).


class Mapping(object):

    def __init__(self, world_size=1, rank=0, *, tp_size=1, pp_size=1):
        self.world_size = world_size
        self.rank = rank
        self.tp_size = tp_size
        self.pp_size = pp_size

    @classmethod
    def from_dict(cls, mapping: dict):
        return cls(**mapping)

    def to_dict(self):
        return {'world_size': self.world_size, 'rank': self.rank, 'tp_size': self.tp_size,
                'pp_size': self.pp_size}
