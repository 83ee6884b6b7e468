"""``mmcli synth``: a synthetic multimodal cohort in real file formats (see :mod:`.write` for the story)."""
from mmcli.stages.synth.write import MARKER, SynthInputError, SynthResult, synth

__all__ = ["MARKER", "SynthInputError", "SynthResult", "synth"]
