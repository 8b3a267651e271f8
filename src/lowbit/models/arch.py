"""Architecture knowledge: the table lives in ``lowbit.arch`` (the bottom layer, so the KV cache, the
exporters, transforms and methods all read one table); this module keeps the older import path."""

from lowbit.arch import (ARCHITECTURES, Architecture, ScaleGroup, architecture_of, decoder_blocks, get_submodule,
                         scale_groups, types_with)

__all__ = ["ARCHITECTURES", "Architecture", "ScaleGroup", "architecture_of", "decoder_blocks", "get_submodule",
           "scale_groups", "types_with"]
