"""The talker: codec tokens from the thinker's streamed hidden states, every live request in one batch."""

from omnitalk.engine.talker.runner import Talker
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.engine.talker.sequence import TalkerSequence

__all__ = ["Talker", "TalkerSampling", "TalkerSequence"]
