"""CPU preset of ``apr-jax demo``: the mini model on 3 input numbers up to 30, where CPU-trained models solve.

On the paper's 4-number task (the ``mini`` preset) a 5M-parameter model trained for hours on two cores solves
no problem (docs/experiments.md). With 3 numbers up to 30 the SoS+ demonstrations are 312 tokens long instead
of 1,139, the SoS+ solver solves 69% of the problems (the APR solver 81% with the paper's beams), and the same model trained for 30
minutes on two cores solves 14% of 200 validation problems greedily, 31.5% after about 70 minutes in
three warm-restarted stages (docs/experiments.md). The price: an APR parent's longest call (413 tokens on
average with the paper's beams, 244 with this preset's) is not much shorter than a whole SoS+ trace, so the
paper's same-context advantage has little room to show.
An APR model warm-started from that SoS+ model (1,100 steps on data with child-count prefixes) spawns and
solves 13% (22% with the labelled spawn aid): below SoS+, with the loss in the parent's final answer, which it
assembles from a join of about 9 children far less often than from a join of 4. Hence the one deviation from
the paper's solvers here: the APR solver's root beam is U{1..4} (``apr_max_beam=4``; the paper's U{1..10}
stays in ``mini`` and ``paper``), so demonstrations spawn 2.0 children on average instead of 4.8 and the
APR solver solves 65% instead of 81% of the problems; the demo's APR model then solves 25% plain instead of 8%
(docs/experiments.md).

Same model, tokenizer and vocabulary as ``mini`` (checkpoints are interchangeable). ``train`` is the SoS+ run
(1,500 steps of 8, about 3.7M tokens); the APR run of docs/experiments.md overrides it to the same token count
with ``--batch-size 24 --steps 960``.
"""

import dataclasses

from apr_jax.presets import Preset
from configs import mini


def get_config() -> Preset:
    base = mini.get_config()
    data = dataclasses.replace(base.data, num_inputs=3, max_num=30, apr_max_beam=4)
    train = dataclasses.replace(base.train, batch_size=8, steps=1500, eval_every=250, ckpt_every=50,
                                keep_checkpoints=40, eval_batches=4, pad_policy="bucket")
    return dataclasses.replace(base, name="mini3", data=data, train=train)
