"""curate: synthesize and curate long-context training corpora from one declarative manifest.

The distribution ``curate-longctx`` installs three import packages: ``curate`` (the engine),
``synthesizers`` and ``filters`` (the stages).
"""

from curate.errors import BadRecord, ConfigError, CurateError, RetryableError
from curate.registry import get_stage, register_stage
from curate.stage import Filter, Stage, StageParams, Synthesizer

__version__ = "0.1.0"
__all__ = ["BadRecord", "ConfigError", "CurateError", "Filter", "RetryableError", "Stage", "StageParams",
           "Synthesizer", "get_stage", "register_stage", "__version__"]
