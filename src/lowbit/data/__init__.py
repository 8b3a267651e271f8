"""Text data for calibration and evaluation: named corpora, local files, self-generated text."""

from lowbit.data.calibration import calibration_windows, get_calibration, selfgen_windows
from lowbit.data.corpora import CORPORA, load_rows, load_text
from lowbit.data.windows import check_batch_size, check_token_windows, eval_windows, random_windows, tokenize_text

__all__ = [
    "CORPORA",
    "calibration_windows",
    "check_batch_size",
    "check_token_windows",
    "eval_windows",
    "get_calibration",
    "load_rows",
    "load_text",
    "random_windows",
    "selfgen_windows",
    "tokenize_text",
]
