"""Latent codecs (docs/METHOD.md section 5): the identity pixel codec and the diffusers VAE codec."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from ctgridit.core.codecs import PixelCodec, VAECodec
from ctgridit.core.legacy_folders import CODEC_FILE, legacy_codec
from tests.conftest import VAE_SCALE, tiny_vae

SCALE = VAE_SCALE


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vae")
    tiny_vae().save_pretrained(str(folder))
    return folder


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ------------------------------------------------------------------ pixel
def test_pixel_codec_is_the_identity():
    codec = PixelCodec(channels=1, chunk_size=3)
    x = torch.randn(7, 1, 6, 10)
    assert torch.equal(codec.encode(x), x)
    assert torch.equal(codec.decode(x), x)
    assert codec.latent_size(6, 10) == (6, 10)
    assert (codec.image_channels, codec.latent_channels, codec.downscale) == (1, 1, 1)


def test_pixel_codec_round_trips_through_a_folder(tmp_path):
    PixelCodec(channels=1, chunk_size=5).save_pretrained(tmp_path / "codec")
    saved = json.loads((tmp_path / "codec" / "config.json").read_text())
    assert saved["_class_name"] == "PixelCodec" and (saved["channels"], saved["chunk_size"]) == (1, 5)
    codec = PixelCodec.from_pretrained(tmp_path / "codec", local_files_only=True, use_safetensors=True)
    assert isinstance(codec, PixelCodec)
    assert (codec.image_channels, codec.latent_channels, codec.chunk_size) == (1, 1, 5)
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(codec.decode(codec.encode(x)), x)


def test_pixel_codec_carries_device_and_dtype():
    codec = PixelCodec(channels=1).to(torch.float16)
    assert (codec.device, codec.dtype) == (torch.device("cpu"), torch.float16)


def test_old_codec_folders_still_load(tmp_path, vae_dir):
    """codec/codec.json (and codec/vae/) as ctgridit wrote them before a codec was a diffusers model."""
    (tmp_path / CODEC_FILE).write_text(json.dumps({"kind": "pixel", "chunk_size": 5, "channels": 1}))
    codec = legacy_codec(tmp_path)
    assert isinstance(codec, PixelCodec) and (codec.image_channels, codec.chunk_size) == (1, 5)
    shutil.copytree(vae_dir, tmp_path / "vae")
    (tmp_path / CODEC_FILE).write_text(json.dumps({"kind": "vae", "chunk_size": 2, "scaling_factor": 0.5}))
    codec = legacy_codec(tmp_path)
    assert isinstance(codec, VAECodec) and (codec.scaling_factor, codec.chunk_size) == (0.5, 2)
    x = images(2)
    torch.testing.assert_close(codec.encode(x), VAECodec.from_vae(tiny_vae(), scaling_factor=0.5).encode(x))
    (tmp_path / CODEC_FILE).write_text(json.dumps({"kind": "jpeg", "chunk_size": 4}))
    with pytest.raises(ValueError, match="jpeg"):
        legacy_codec(tmp_path)


# -------------------------------------------------------------------- VAE
def test_vae_codec_loads_from_a_local_folder(vae_dir):
    codec = VAECodec.from_autoencoder(vae_dir, local_files_only=True)
    assert (codec.image_channels, codec.latent_channels, codec.downscale) == (3, 4, 2)
    assert codec.scaling_factor == pytest.approx(SCALE)
    assert codec.latent_size(16, 24) == (8, 12)
    with pytest.raises(ValueError, match="multiple"):
        codec.latent_size(15, 16)
    # the weights are the saved ones, not a fresh init
    reference = tiny_vae()
    for (name, p), q in zip(reference.state_dict().items(), codec.vae.state_dict().values()):
        assert torch.equal(p, q), name


def test_vae_encode_is_the_scaled_posterior_mean(vae_dir):
    codec = VAECodec.from_autoencoder(vae_dir, local_files_only=True)
    x = images(5)
    z = codec.encode(x)
    assert z.shape == (5, 4, 8, 8)
    with torch.no_grad():
        mean = tiny_vae().encode(x).latent_dist.mean
    torch.testing.assert_close(z, SCALE * mean, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z, mean)                       # the factor really is applied
    assert torch.equal(codec.encode(x), z)                   # deterministic: the mean, no sampling
    with torch.no_grad():
        expected = tiny_vae().decode(z / SCALE).sample
    torch.testing.assert_close(codec.decode(z), expected, rtol=1e-5, atol=1e-6)


def test_vae_chunked_equals_one_shot(vae_dir):
    x = images(7)
    small = VAECodec.from_autoencoder(vae_dir, chunk_size=3, local_files_only=True)
    big = VAECodec.from_autoencoder(vae_dir, chunk_size=100, local_files_only=True)
    calls = []
    original = small.vae.encode
    small.vae.encode = lambda t, *a, **k: (calls.append(len(t)), original(t, *a, **k))[1]
    z_small, z_big = small.encode(x), big.encode(x)
    assert calls == [3, 3, 1]                                # really chunked
    torch.testing.assert_close(z_small, z_big, rtol=1e-4, atol=1e-5)     # batch-size dependent kernels
    torch.testing.assert_close(small.decode(z_big), big.decode(z_big), rtol=1e-4, atol=1e-5)


def test_vae_decode_of_encode_has_the_image_shape(vae_dir):
    codec = VAECodec.from_autoencoder(vae_dir, chunk_size=4, local_files_only=True)
    x = images(6, size=24)
    out = codec.decode(codec.encode(x))
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_vae_codec_round_trips_through_save_and_load(vae_dir, tmp_path):
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
    codec = VAECodec.from_vae(vae, chunk_size=2, scaling_factor=0.5)     # an override must survive the round trip
    codec.save_pretrained(tmp_path / "codec")
    saved = json.loads((tmp_path / "codec" / "config.json").read_text())
    assert saved["_class_name"] == "VAECodec" and saved["scaling_factor"] == 0.5 and saved["chunk_size"] == 2
    loaded = VAECodec.from_pretrained(tmp_path / "codec", local_files_only=True, use_safetensors=True)
    assert isinstance(loaded, VAECodec)
    assert (loaded.scaling_factor, loaded.chunk_size, loaded.latent_channels) == (0.5, 2, 4)
    x = images(3)
    torch.testing.assert_close(loaded.encode(x), codec.encode(x), rtol=0, atol=0)
    z = codec.encode(x)
    torch.testing.assert_close(loaded.decode(z), codec.decode(z), rtol=0, atol=0)
