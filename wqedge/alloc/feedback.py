"""Moved to wqedge.quant.feedback (error feedback is quantization, not allocation); this name stays for
scripts that import it."""
from ..quant.feedback import *  # noqa: F401,F403
from ..quant.feedback import __all__  # noqa: F401
