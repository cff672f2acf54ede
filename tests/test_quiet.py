"""prunedlora.quiet: exactly the known-harmless messages are dropped, and the library hooks it relies on exist."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from prunedlora import quiet


def test_the_upstream_functions_replaced_for_one_call_still_exist():
    """Fails when accelerate or lm-eval rename what ``quiet`` swaps out (then the chatter is back)."""
    import accelerate.utils.other as other
    import lm_eval.evaluator as evaluator

    assert callable(other.is_deepspeed_available)
    assert callable(evaluator.get_git_commit_hash) and callable(evaluator.add_env_info)


@pytest.fixture
def hflm_log(caplog):
    logger = logging.getLogger("lm_eval.models.huggingface")
    yield logger
    quiet.install(verbose=False)


def test_named_messages_are_dropped_others_pass_and_verbose_keeps_all(hflm_log, caplog):
    harmless = "`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored."
    real = "Something lm-eval wants the user to know"
    quiet.install(verbose=False)
    with caplog.at_level(logging.WARNING, logger=hflm_log.name):
        hflm_log.warning(harmless)
        hflm_log.warning(real)
        logging.getLogger("some.other.library").warning(harmless)  # the filter is on one logger only
    assert [r.getMessage() for r in caplog.records] == [real, harmless]
    caplog.clear()
    quiet.install(verbose=True)
    with caplog.at_level(logging.WARNING, logger=hflm_log.name):
        hflm_log.warning(harmless)
    assert [r.getMessage() for r in caplog.records] == [harmless] and quiet.verbose()


def test_lm_eval_probes_record_git_and_versions_without_printing(capfd):
    import lm_eval.evaluator as evaluator

    quiet.install(verbose=False)
    with quiet.lm_eval_probes():
        storage: dict = {}
        evaluator.add_env_info(storage)
        evaluator.get_git_commit_hash()
    assert storage["lm_eval_version"] and storage["transformers_version"]
    assert "fatal" not in capfd.readouterr().err
    assert evaluator.add_env_info is not quiet._versions_only  # restored after the block


def test_export_does_not_import_deepspeed():
    """``save_pretrained`` inside ``deepspeed_left_unimported`` (as the recipe exports) leaves DeepSpeed unloaded."""
    code = (
        "import sys, tempfile\n"
        "from prunedlora import quiet\n"
        "from prunedlora.config import TinyModelConfig\n"
        "from prunedlora.models.tiny import build_tiny_llama\n"
        "model = build_tiny_llama(TinyModelConfig(), vocab_size=259)\n"
        "with quiet.deepspeed_left_unimported():\n"
        "    model.save_pretrained(tempfile.mkdtemp())\n"
        "print('deepspeed' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False" and "Setting accelerator" not in out.stderr
