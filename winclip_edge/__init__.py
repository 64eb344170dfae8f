"""winclip-edge runtime: WinCLIP / WinCLIP+ anomaly detection with numpy, OpenCV and ONNX Runtime (no torch)."""
from .bundle import Bundle, BundleError
from .engines.config import EngineConfig
from .errors import WinclipError
from .inspector import InspectionResult, Inspector
from .scoring import ScoringOptions

__version__ = "0.1.0"
__all__ = ["Bundle", "BundleError", "EngineConfig", "InspectionResult", "Inspector", "ScoringOptions", "WinclipError",
           "__version__"]
