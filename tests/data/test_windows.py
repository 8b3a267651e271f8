"""Token-window checks: the one guard every calibration / analysis entry point uses."""

from __future__ import annotations

import pytest
import torch

from lowbit.data import check_token_windows
from lowbit.errors import LowbitError


def test_check_token_windows_accepts_id_windows_and_names_what_is_wrong():
    check_token_windows(torch.zeros(2, 8, dtype=torch.long), "quantization")
    check_token_windows(torch.zeros(1, 2, dtype=torch.int), "sensitivity", min_tokens=2)
    with pytest.raises(LowbitError, match=r"quantization needs a 2-D tensor of token ids .*shape \(8,\)"):
        check_token_windows(torch.zeros(8, dtype=torch.long), "quantization")
    with pytest.raises(LowbitError, match="torch.float32"):
        check_token_windows(torch.zeros(2, 8), "analysis")  # hidden states, not ids
    with pytest.raises(LowbitError, match="got list"):
        check_token_windows([[1, 2]], "analysis")
    with pytest.raises(LowbitError, match="at least one window of at least 2 token"):
        check_token_windows(torch.zeros(3, 1, dtype=torch.long), "sensitivity", min_tokens=2)
    with pytest.raises(LowbitError, match="0 x 8"):
        check_token_windows(torch.zeros(0, 8, dtype=torch.long), "KV-cache calibration")

