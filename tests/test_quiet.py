"""A quiet start: no library notices in the terminal or the job logs, real warnings kept."""

import os
import subprocess
import sys

from lorastudy.quiet import filtered_stderr


def test_asking_a_model_prints_the_answer_and_nothing_else(tiny_preset):
    done = subprocess.run(
        [sys.executable, "-m", "lorastudy.cli", "ask", "--model", str(tiny_preset), "--max-new-tokens", "4", "Name a river."],
        capture_output=True, text=True, check=True,
    )
    assert done.stderr == ""
    assert done.stdout.strip()


def test_only_the_listed_notices_are_dropped():
    code = (
        "import os, sys, warnings\n"
        "from lorastudy.quiet import filtered_stderr\n"
        "with filtered_stderr():\n"
        "    os.write(2, b'I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. You may see...\\n')\n"
        "    os.write(2, b'W0000 00:00:1.0 1 something.cc:1] a real warning\\n')\n"
        "    warnings.warn('a Python warning')\n"
        "    print('on sys.stderr', file=sys.stderr)\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "oneDNN" not in err
    assert "a real warning" in err and "a Python warning" in err and "on sys.stderr" in err


def test_what_the_block_wrote_comes_out_when_it_raises(capfd):
    try:
        with filtered_stderr():
            os.write(2, b"the reason it failed\n")
            raise RuntimeError
    except RuntimeError:
        pass
    assert capfd.readouterr().err == "the reason it failed\n"



def test_a_probe_for_tensorflow_does_not_undo_the_quiet_import():
    code = "import importlib.util, lorastudy\nassert importlib.util.find_spec('tensorflow')\nimport tensorflow\n"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr == ""


def test_keras_imports_without_what_the_study_never_uses_from_it():
    # lorastudy.imports: skipped while Keras and KerasHub import, importable as usual afterwards.
    code = (
        "import sys, lorastudy, keras_hub\n"
        "print(sorted({'matplotlib', 'sklearn', 'rouge_score', 'nltk'} & set(sys.modules)))\n"
        "import matplotlib.pyplot\n"
        "from lorastudy.scoring import rouge_per_example\n"
        "print(rouge_per_example(['the cat sat'], ['the cat sat'])['rougeL'][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "1.0"]
