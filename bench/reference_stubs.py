"""Stand-ins for modules the reference repositories (hustvl/LightningDiT, bytetriper/RAE) import at
the top of their model files but never use on the code paths the benches run: installed here only
when the real module is missing."""

from __future__ import annotations

import sys
import types


def stub_missing() -> None:
    def stub(name: str, **attrs: object) -> None:
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            sys.modules[name] = mod

    stub("transformers", SwinModel=object)
    stub("regex", B=None)
    stub("fairscale")
    stub("fairscale.nn")
    stub("fairscale.nn.model_parallel")
    stub("fairscale.nn.model_parallel.initialize")
    stub("fairscale.nn.model_parallel.layers", ColumnParallelLinear=object,
         ParallelEmbedding=object, RowParallelLinear=object)
