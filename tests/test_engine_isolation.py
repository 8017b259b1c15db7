"""The engine-test isolation (tests/engine_isolation.py): a test that crashes its process inside an engine
fails alone, with the signal named, and the suite around it runs on."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_a_crashing_engine_test_fails_alone_and_the_suite_goes_on(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from engine_isolation import pytest_configure, pytest_runtest_logreport, pytest_runtest_protocol
    """))
    (tmp_path / "test_crash.py").write_text(textwrap.dedent("""
        import ctypes, os
        import pytest

        @pytest.mark.engine("onnxruntime")
        def test_engine_ok():
            assert os.environ.get("WQEDGE_TEST_CHILD_REPORT")   # really ran in the child

        @pytest.mark.engine("onnxruntime")
        def test_engine_fails():
            assert 1 == 2

        @pytest.mark.engine("onnxruntime")
        def test_engine_skips():
            pytest.skip("no such engine here")

        @pytest.mark.engine("onnxruntime")
        def test_engine_segfaults():
            ctypes.string_at(0)        # SIGSEGV, as llama.cpp's AMX path did

        @pytest.mark.engine("onnxruntime")
        def test_engine_after_the_crash():
            pass

        def test_in_process():
            assert not os.environ.get("WQEDGE_TEST_CHILD_REPORT")
    """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out           # failures reported; the parent itself did not die
    assert "2 failed, 3 passed, 1 skipped" in out, out
    assert "PASSED test_crash.py::test_engine_ok" in out and "PASSED test_crash.py::test_in_process" in out
    assert "FAILED test_crash.py::test_engine_fails" in out and "assert 1 == 2" in out
    assert "FAILED test_crash.py::test_engine_segfaults" in out and "SIGSEGV" in out
    # the child died with the crash: a new child ran what it had not reached
    assert "PASSED test_crash.py::test_engine_after_the_crash" in out
    assert "no such engine here" in out
