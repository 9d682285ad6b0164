"""`from_pretrained(..., device_map=...)`: both fusions load under accelerate's big-model dispatch and give the
logits of a plain load, a device map never splits a layer (`_no_split_modules`: the vision encoder's, perceiver and
decoder layers, and the cross-attention blocks, the LM's own layer classes gathered from the text backbone), and
visual tokens move to the device and dtype of what consumes them (the text embeddings; each cross-attention block).

On the CPU the only "other device" is the disk: offloaded weights live on the meta device and accelerate's hooks bring
them in for each call. The GPU test splits the model across a CUDA device and the CPU.
"""

import pytest
import torch
from conftest import image_prompt, tiny_autoregressive_model
from test_distributed import BUILDERS, batch, build

import vlmforge


@pytest.fixture(scope="module", params=list(BUILDERS))
def saved(request, tmp_path_factory):
    """(fusion, folder, inputs with one image, the plain load's logits on them)."""
    fusion = request.param
    model = build(fusion).eval()
    folder = tmp_path_factory.mktemp(fusion)
    model.save_pretrained(folder)
    inputs = {key: value for key, value in batch(fusion, n_images=1).items() if key != "labels"}
    with torch.no_grad():
        logits = vlmforge.AutoModelForVision2Seq.from_pretrained(folder)(**inputs).logits
    return fusion, folder, inputs, logits


def logits_of(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_no_split_modules_name_every_layer_class(saved):
    fusion, folder, _, _ = saved
    model = vlmforge.AutoModelForVision2Seq.from_pretrained(folder)
    expected = {"VisionEncoderLayer", "PerceiverLayer", "LlamaDecoderLayer"}  # the last from the Llama backbone
    if fusion == "cross_attention":
        expected |= {"GatedCrossAttentionBlock", "CrossAttentionLlamaDecoderLayer"}  # a fused decoder layer
    assert set(model._no_split_modules) == expected
    present = {type(module).__name__ for module in model.modules()}
    assert expected <= present


def test_device_map_auto_gives_the_logits_of_a_plain_load(saved):
    _, folder, inputs, expected = saved
    model = vlmforge.AutoModelForVision2Seq.from_pretrained(folder, device_map="auto")
    assert torch.equal(logits_of(model, inputs), expected)


def split_inside_a_layer(model) -> list[str]:
    """The device-map entries that lie strictly inside a module of a `_no_split_modules` class."""
    inside = []
    for name in model.hf_device_map:
        parts = name.split(".") if name else []
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
        if any(type(model.get_submodule(a)).__name__ in model._no_split_modules for a in ancestors):
            inside.append(name)
    return inside


def test_device_map_auto_offloading_half_the_model_to_disk_gives_the_same_logits(saved, tmp_path):
    _, folder, inputs, expected = saved
    plain = vlmforge.AutoModelForVision2Seq.from_pretrained(folder)
    budget = sum(p.numel() * p.element_size() for p in plain.parameters()) // 2
    model = vlmforge.AutoModelForVision2Seq.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path
    )
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}, model.hf_device_map
    assert split_inside_a_layer(model) == []
    assert torch.equal(logits_of(model, inputs), expected)


# ---- visual tokens go where they are consumed -------------------------------------------------------------------


def test_merged_visual_tokens_take_the_text_embeddings_dtype():
    model = tiny_autoregressive_model().model
    ids = torch.tensor([image_prompt(1, image_seq_len=4)])
    embeds = model.get_input_embeddings()(ids)  # (1, S, D) float32
    features = torch.randn(1, 4, embeds.shape[-1], dtype=torch.float64)  # (1, T, D) from a float64 "device"
    merged = model.merge_image_features(embeds, ids == model.config.image_token_id, features, None)
    assert merged.dtype == embeds.dtype and merged.device == embeds.device
    assert torch.equal(merged[ids == model.config.image_token_id], features[0].to(embeds.dtype))


def test_image_keys_and_values_take_each_blocks_dtype():
    model = build("cross_attention").model
    block = model.cross_attention_blocks[1].double()  # a block "placed" apart from the connector
    features = torch.randn(1, 4, model.config.text_config.hidden_size)  # (1, M, D) float32
    text = torch.randn(1, 3, features.shape[-1], dtype=torch.float64)
    mask, has_image = torch.zeros(1, 1, 3, 4, dtype=torch.float64), torch.ones(1, 3, 1, dtype=torch.float64)
    _, (key, value) = block(text, attention_mask=mask, has_image=has_image, image_states=features)
    assert key.dtype == value.dtype == torch.float64
    assert torch.equal(key, block.cross_attn.image_key_values(features.double())[0])


class _Projected(Exception):
    pass


def test_offloaded_block_projects_the_tokens_where_the_text_is():
    """Offloaded weights sit on the meta device, and accelerate's hook brings them to where the text is: the visual
    tokens go there too, never to the meta device (where they would be lost)."""
    block = build("cross_attention").model.cross_attention_blocks[0]
    meta_block = type(block)(block.cross_attn.config).to("meta")
    seen = []

    def record(states):
        seen.append(states.device)
        raise _Projected

    meta_block.cross_attn.image_key_values = record
    width = block.cross_attn.k_proj.in_features
    with pytest.raises(_Projected):
        meta_block(
            torch.randn(1, 3, width),
            attention_mask=torch.zeros(1, 1, 3, 4),
            has_image=torch.ones(1, 3, 1),
            image_states=torch.randn(1, 4, width),
        )
    assert seen == [torch.device("cpu")]


@pytest.mark.gpu
def test_vision_on_cuda_and_text_on_cpu_gives_the_logits_of_a_cpu_load(saved):
    fusion, folder, inputs, expected = saved
    device_map = {"model.vision_model": 0, "model.connector": 0, "model.text_model": "cpu", "lm_head": "cpu"}
    if fusion == "cross_attention":
        device_map["model.cross_attention_blocks"] = "cpu"
    model = vlmforge.AutoModelForVision2Seq.from_pretrained(folder, device_map=device_map)
    assert model.model.vision_model.device.type == "cuda" and model.model.text_model.device.type == "cpu"
    torch.testing.assert_close(logits_of(model, inputs), expected, atol=1e-4, rtol=1e-4)
