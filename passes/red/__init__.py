"""RED / RED++ data-free redundancy pruning (docs/pruning.md, thesis §2.1–§2.2, Appendix C).

* :class:`HashWeights` (``hash-weights``, :mod:`.hashing`): per-layer adaptive KDE hashing;
* :class:`MergeNeurons` (``merge-neurons``, :mod:`.merge`): exact / angular / α merging of
  output neurons with the consumer's columns summed;
* :class:`DecomposeDepthwise` (``decompose-depthwise``, :mod:`.depthwise`): uneven
  depthwise-separable decomposition of k×k Convs.

The ``red`` preset runs them after BN folding: hashing creates the exact redundancies that
merging and the decomposition then remove.
"""

from .depthwise import DecomposeDepthwise
from .hashing import HashWeights
from .merge import MergeNeurons

RED_PASSES = ("hash-weights", "merge-neurons", "decompose-depthwise")

__all__ = ["RED_PASSES", "DecomposeDepthwise", "HashWeights", "MergeNeurons"]
