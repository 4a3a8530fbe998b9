import sys
import warnings

# torchdiffeq imports torch.jit.script, which warns on every start; not our concern.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")

from engine.cli import main  # noqa: E402

sys.exit(main())
