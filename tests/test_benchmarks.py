"""The profiling tool: a real trace of a small call, parsed into per-operation times."""

import pytest

from benchmarks import profile


def test_profile_names_the_compiled_operations(capsys):
    profile.main(["--size=28", "--batch=2", "--calls=2", "--top=50"])
    out = capsys.readouterr().out
    assert "register baseline 28², batch 2, 2 calls on" in out
    assert "µs per call" in out
    times = [line.split(maxsplit=1) for line in out.splitlines() if "fusion" in line]
    assert times and all(float(us) >= 0 for us, _ in times)


@pytest.mark.parametrize("arg", ["--bad=1", "--what=infer", "--size"])
def test_profile_rejects_bad_arguments(arg):
    with pytest.raises(SystemExit, match="error: "):
        profile.main([arg])
