"""DuoAttention head identification (qv_jax.duo): the gates' gradient, a known answer, the identified pattern
against a random one, checkpoints and resume, the tsv round trip into sparse decoding, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.attention import SparsityConfig
from qv_jax.duo import HeadGates, identify_heads
from qv_jax.duo.data import COLOURS, passkey_sample, sample_for_step, sample_lengths, video_sample
from qv_jax.duo.gated import distill_loss
from qv_jax.duo.train import sample_inputs, streaming_distance
from qv_jax.errors import ConfigError, InputError
from qv_jax.runtime import VisionLanguageModel
from qv_jax.testing import random_model, tiny_config

SINK, RECENT, LENGTH = 4, 12, 128
BASE = tiny_config()
# 4 KV heads of 2 query heads each: enough heads for a pattern to be better or worse than a random one
CONFIG = dataclasses.replace(
    BASE, text=dataclasses.replace(BASE.text, num_heads=8, num_kv_heads=4, mrope_section=(1, 1, 2))
)
# (layer, KV head) whose query heads' output projection rows are zeroed: they contribute nothing
SILENT = ((0, 1), (0, 3), (1, 2))
TRAIN = dict(sink=SINK, recent=RECENT, min_length=LENGTH, max_length=LENGTH, lr=0.05, reg=0.005)


def _silenced(model: VisionLanguageModel) -> VisionLanguageModel:
    G = CONFIG.text.num_heads // CONFIG.text.num_kv_heads
    for layer, head in SILENT:
        o = model.state["text"]["layers"][layer]["o"]
        o.set_value(o.get_value().at[head * G : (head + 1) * G].set(0.0))
    return model


@pytest.fixture(scope="module")
def silenced(tmp_path_factory):
    return _silenced(random_model(CONFIG, tokenizer_dir=tmp_path_factory.mktemp("tok"), seed=3))


@pytest.fixture(scope="module")
def trained(silenced):
    return identify_heads(silenced, steps=24, seed=0, **TRAIN)


def test_gradient_matches_finite_differences(silenced):
    inputs = sample_inputs(silenced, sample_for_step(silenced, np.array([LENGTH]), 0, 0))

    def loss(gates):
        return distill_loss(gates, silenced.graphdef, silenced.state, *inputs, sink=SINK, recent=RECENT, reg=0.05)[0]

    # one compilation serves both the gradient and the finite differences' losses
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    gates = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.8, (2, 4)), jnp.float32)
    grad = np.asarray(value_and_grad(gates)[1])
    eps = 1e-2
    for i, j in [(0, 0), (0, 2), (1, 1), (1, 3)]:
        step = jnp.zeros_like(gates).at[i, j].set(eps)
        estimate = (float(value_and_grad(gates + step)[0]) - float(value_and_grad(gates - step)[0])) / (2 * eps)
        np.testing.assert_allclose(grad[i, j], estimate, rtol=2e-2, atol=2e-5)
    # a silent head's gate moves only the regulariser: 0.05 / 8 gates
    np.testing.assert_allclose(grad[0, 1], 0.05 / 8, rtol=1e-3)


def test_silent_heads_end_lowest(trained):
    assert trained.gates.shape == (2, 4) and trained.gates.dtype == np.float32
    assert np.all((trained.gates >= 0) & (trained.gates <= 1))
    assert trained.losses.shape == (24,) and np.all(np.isfinite(trained.losses))
    order = np.argsort(trained.gates.reshape(-1), kind="stable")
    silent = {layer * 4 + head for layer, head in SILENT}
    assert set(order[: len(SILENT)].tolist()) == silent
    assert trained.gates.reshape(-1)[list(silent)].max() < trained.gates.reshape(-1)[order[len(SILENT) :]].min()


def test_identified_pattern_beats_random(silenced, trained, tmp_path):
    path = trained.save(tmp_path)
    streaming = SparsityConfig.from_duo_attention(path, sparsity=0.5).streaming_mask(2, 4)
    count = int(streaming.sum())
    rng = np.random.default_rng(1)
    held_out = [passkey_sample(silenced.tokenizer, LENGTH, np.random.default_rng([99, i])) for i in range(2)]

    def distance(mask) -> float:
        return streaming_distance(silenced, mask, held_out, sink=SINK, recent=RECENT)

    identified = distance(streaming)
    randoms = []
    for _ in range(4):
        mask = np.zeros(8, bool)
        mask[rng.choice(8, count, replace=False)] = True
        randoms.append(distance(mask.reshape(2, 4)))
    assert identified < min(randoms)


def test_tsv_round_trip_generates(trained, tmp_path):
    path = trained.save(tmp_path / "heads")
    assert path.name == "full_attention_heads.tsv" and path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    np.testing.assert_allclose(np.loadtxt(path, delimiter="\t"), trained.gates, atol=1e-6)
    with pytest.raises(Exception, match="exists"):
        trained.save(tmp_path / "heads")
    trained.save(tmp_path / "heads", overwrite=True)
    sparsity = SparsityConfig.from_duo_attention(
        tmp_path / "heads",
        sparsity=0.5,
        sink=SINK,
        local=RECENT,
        page_size=8,
        logical_page_size=4,
        token_budget=None,
        backend="xla",
    )
    silent = np.zeros((2, 4), bool)
    silent[tuple(zip(*SILENT, strict=True))] = True
    assert np.array_equal(sparsity.streaming_mask(2, 4) & silent, silent)
    model = _silenced(random_model(CONFIG, seed=3, sparsity=sparsity))
    ids = np.arange(3, 40)[None]
    out = model.generate(ids, max_new_tokens=2, eos_token_id=[])
    assert out.shape == (1, 39)


def test_resume_continues_to_the_same_gates(silenced, trained, tmp_path):
    settings = dict(steps=24, seed=0, checkpoint_every=8, **TRAIN)
    whole = trained

    def interrupt(step, loss):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        identify_heads(silenced, checkpoint_dir=tmp_path, progress=interrupt, **settings)
    assert [p.name for p in tmp_path.iterdir()] == ["step_8"]
    resumed = identify_heads(silenced, checkpoint_dir=tmp_path, resume=True, **settings)
    np.testing.assert_allclose(resumed.gates, whole.gates, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-6)


def test_on_the_fly_scores(silenced):
    gates = identify_heads(
        silenced, method="on-the-fly", seed=0, sink=SINK, recent=RECENT, min_length=LENGTH, max_length=LENGTH
    )
    assert isinstance(gates, HeadGates) and gates.method == "on-the-fly" and gates.losses.size == 0
    # the answer queries sit past sink + recent: most of a near-uniform attention falls outside the window
    assert gates.gates.shape == (2, 4) and np.all((gates.gates > 0.5) & (gates.gates < 1.0))


def test_samples(silenced):
    tokenizer = silenced.tokenizer
    sample = passkey_sample(tokenizer, 512, np.random.default_rng(0), passkeys=3, words=4)
    assert sample.ids.shape == sample.answer.shape == (512,)
    answer = tokenizer.decode(sample.ids[sample.answer == 1]).strip().rstrip(".").split("; ")
    text = tokenizer.decode(sample.ids[sample.answer == 0])
    assert len(answer) == 3 and all(len(key.split()) == 4 for key in answer)
    assert text.endswith("What are the pass keys? They are:")
    depths = [text.index(f"The pass key {i + 1} is {key}.") / len(text) for i, key in enumerate(answer)]
    assert depths == sorted(depths) and 0.03 < depths[0] and depths[-1] < 0.95
    with pytest.raises(InputError, match="too short"):
        passkey_sample(tokenizer, 20, np.random.default_rng(0))
    assert sample_lengths(1000, 32000).tolist()[:2] == [1024, 5440] and sample_lengths(1000, 32000)[-1] == 32000
    assert sample_lengths(100, 100).tolist() == [100]


def test_video_samples(silenced):
    """Needle frames at sorted depths, the colours in order as the answer, the exact length, positions by the
    model's own rule, and the visual tokens in the pad slots of the embeddings."""
    tokenizer, config = silenced.tokenizer, silenced.config
    for length in (256, 1024):
        sample = video_sample(silenced, length, np.random.default_rng(length), needles=3)
        assert sample.ids.shape == sample.answer.shape == (length,) and sample.positions.shape == (3, length)
        frames = sample.frames
        solid = [i for i in range(0, len(frames), 2) if np.all(frames[i] == frames[i, 0, 0])]
        colours = [next(n for n, rgb in COLOURS.items() if tuple(frames[i, 0, 0]) == rgb) for i in solid]
        assert len(solid) == 3 and 0.03 * len(frames) < solid[0] and solid[-1] < 0.95 * len(frames)
        assert tokenizer.decode(sample.ids[sample.answer == 1]).strip() == ", ".join(colours) + "."
        side = frames.shape[1] // (config.vision.patch_size * config.vision.spatial_merge_size)
        assert np.sum(sample.ids == config.video_token_id) == len(frames) // 2 * side**2
        grid = [[len(frames) // 2, frames.shape[1] // 14, frames.shape[2] // 14]]
        expected, _ = silenced.position_ids(sample.ids[None], video_grid_thw=grid, second_per_grid_ts=[2.0])
        np.testing.assert_array_equal(sample.positions, expected[:, 0])
    x_BTD, positions_3BT, answer_BT = sample_inputs(silenced, sample)
    visual = np.asarray(silenced.encode_video(frames))
    np.testing.assert_array_equal(np.asarray(x_BTD[0])[sample.ids == config.video_token_id], visual)
    assert positions_3BT.shape == (3, 1, length) and answer_BT.shape == (1, length)
    with pytest.raises(InputError, match="too short for a video sample"):
        video_sample(silenced, 64, np.random.default_rng(0))
    kinds = [sample_for_step(silenced, np.array([LENGTH]), 0, step, "both").frames is None for step in range(4)]
    assert kinds == [True, False, True, False]


def test_video_data_trains_and_scores(silenced):
    """Identification on video samples runs both methods; the silenced heads still end lowest."""
    video = dict(TRAIN, data="video")
    gates = identify_heads(silenced, steps=24, seed=0, **video)
    order = np.argsort(gates.gates.reshape(-1), kind="stable")
    assert set(order[: len(SILENT)].tolist()) == {layer * 4 + head for layer, head in SILENT}
    lengths = dict(sink=SINK, recent=RECENT, min_length=LENGTH, max_length=LENGTH)
    scored = identify_heads(silenced, method="on-the-fly", data="both", **lengths)
    assert scored.gates.shape == (2, 4) and np.all((scored.gates > 0) & (scored.gates < 1))


def test_bad_input(tmp_path, silenced):
    no_tokenizer = VisionLanguageModel.random(CONFIG)
    with pytest.raises(ConfigError, match="no tokenizer"):
        identify_heads(no_tokenizer, steps=1, sink=SINK, recent=RECENT, min_length=LENGTH, max_length=LENGTH)
    with pytest.raises(InputError, match="must exceed sink \\+ recent"):
        identify_heads(silenced, steps=1, sink=128, recent=256, min_length=256, max_length=512)
    with pytest.raises(InputError, match="method"):
        identify_heads(silenced, method="guess", min_length=LENGTH, max_length=LENGTH, sink=SINK, recent=RECENT)
    with pytest.raises(InputError, match="data must be one of"):
        identify_heads(silenced, data="audio", min_length=LENGTH, max_length=LENGTH, sink=SINK, recent=RECENT)


def test_cli_identify_heads(tmp_path, capsys):
    import json

    from qv_jax.cli import main
    from qv_jax.testing import write_hf_dir

    model = write_hf_dir(tmp_path / "model", CONFIG, seed=3)
    out = tmp_path / "heads"
    lengths = ["--sink", str(SINK), "--recent", str(RECENT), "--min-length", str(LENGTH), "--max-length", str(LENGTH)]
    base = ["identify-heads", "--model", str(model), "--out", str(out), "--quiet", *lengths]
    assert main([*base, "--method", "on-the-fly", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["out"] == str(out / "full_attention_heads.tsv") and np.array(record["gates"]).shape == (2, 4)
    np.testing.assert_allclose(np.loadtxt(record["out"], delimiter="\t"), record["gates"], atol=1e-6)
    assert (out / "full_attention_heads.png").is_file()
    assert main([*base, "--method", "on-the-fly"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*base[: -len(lengths)], "--sink", "64", "--recent", "64", "--min-length", "100", "--overwrite"]) == 2
    assert "must exceed sink + recent" in capsys.readouterr().err
    assert main([*base, "--overwrite", "--mesh", "2x2"]) == 2  # a mesh that does not fit: before any step
    assert "needs 4 devices" in capsys.readouterr().err
    (model / "tokenizer.json").unlink()
    assert main([*base, "--overwrite"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert not list(out.glob("checkpoints"))


def test_learning_rate_schedule():
    from qv_jax.duo.train import learning_rate

    schedule = learning_rate(0.02, 2000)
    values = [float(schedule(step)) for step in (0, 200, 400, 1000, 1600, 1800, 2000)]
    np.testing.assert_allclose(values, [0.002, 0.011, 0.02, 0.02, 0.02, 0.011, 0.002], rtol=1e-5)
    short = learning_rate(0.02, 10)  # the ramps scale with the steps: 2 of 10
    np.testing.assert_allclose(
        [float(short(s)) for s in (0, 1, 2, 8, 10)], [0.002, 0.011, 0.02, 0.02, 0.002], rtol=1e-5
    )
