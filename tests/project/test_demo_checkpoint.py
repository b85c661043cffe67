"""The bundled demo checkpoint is what the README promises."""

import pytest

from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.counts import count_parameters
from tinybeauty_cli.core.images import builtin_test_set
from tinybeauty_cli.core.paths import demo_checkpoint
from tinybeauty_cli.measure.evaluate import evaluate
from tinybeauty_cli.runtime.runners import runner_for


def test_demo_checkpoint_scores_at_least_33_db_and_5_db_over_doing_nothing():
    loaded = load_model(demo_checkpoint())
    assert count_parameters(loaded.module)[0] == 85_227  # the released layout
    ev = evaluate(runner_for(loaded), builtin_test_set(256))
    assert ev.do_nothing_psnr_db <= 30.5  # the makeup is strong: doing nothing scores about 30 dB
    assert ev.target_psnr_db >= 33.0
    assert ev.target_psnr_db >= ev.do_nothing_psnr_db + 5.0
    # the training command recorded the same figure in the artifact's history
    recorded = loaded.history[0].figures["test_psnr_db"]
    assert recorded == pytest.approx(ev.target_psnr_db, abs=0.01)
