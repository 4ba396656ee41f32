"""zero_core: the flat layout math shared by the optimizer and the checkpoint toolkit.

``zero_core`` never imports ``zero_ckpt`` or fsspec (a test holds this rule).
"""

from zero_core.layout import Fragment, GroupLayout, ParamSpec, compute_partition_numel, overlap

__all__ = ["Fragment", "GroupLayout", "ParamSpec", "compute_partition_numel", "overlap"]
