"""The structural fuzzer (tests/fuzzing.py) on a short budget; ``make fuzz`` runs it long.

Every forged stream and checkpoint must end in success or one line of error, under a
memory cap and a time cap per case, in a child process.
"""

from __future__ import annotations

import fuzzing


def test_fuzzer_short_budget(tmp_path):
    result = fuzzing.run(seconds=45, seed=1, report=tmp_path / "fuzz.json")
    assert result["returncode"] == 0, (result.get("failures"), result["stderr_tail"])
    assert not result["failures"]
    # The budget really ran cases of both kinds (a broken seed would run none).
    assert result["streams"] >= 50 and result["checkpoints"] >= 3, result
