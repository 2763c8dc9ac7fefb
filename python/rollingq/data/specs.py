"""Input specifications of each dataset's modalities (what the encoders are built for).

A spec is ``{"kind": "features" | "spectrogram" | "frames", "shape": [...]}``,
the shape of one sample's tensor without the batch dimension.
"""

from __future__ import annotations

CREMAD_SPECTROGRAM = (257, 188)
KINETICS_FBANK = (1024, 128)
MOSEI_FEATURES = {"vision": 35, "audio": 74, "text": 300}


def input_specs(cfg: dict) -> list[dict]:
    """One spec per modality of ``cfg["data"]["modalities"]`` for dataset ``cfg["data"]["name"]``."""
    data = cfg["data"]
    name, mods = data["name"], data["modalities"]
    if name == "synthetic":
        from .synthetic import SYNTHETIC_DEFAULTS, _per_modality

        opts = {**SYNTHETIC_DEFAULTS, **(data.get("synthetic") or {})}
        tokens = _per_modality(opts["tokens"], len(mods), "tokens")
        return [{"kind": "features", "shape": [int(t), int(opts["feature_dim"])]} for t in tokens]
    if name in ("cremad", "kinetics_sounds"):
        frames = int(data.get("num_frames", 1 if name == "cremad" else 3))
        size = int(data.get("image_size", 224))
        if name == "cremad":
            audio_shape = list(CREMAD_SPECTROGRAM)
        else:
            audio_shape = [int(data.get("fbank_frames", KINETICS_FBANK[0])), int(data.get("fbank_bins", KINETICS_FBANK[1]))]
        specs = []
        for m in mods:
            if m == "audio":
                specs.append({"kind": "spectrogram", "shape": audio_shape})
            elif m == "visual":
                specs.append({"kind": "frames", "shape": [frames, 3, size, size]})
            else:
                raise ValueError(f"data.modalities: {name} has 'audio' and 'visual', got {m!r}")
        return specs
    if name == "mosei":
        seq = int(data.get("seq_len", 50))
        specs = []
        for m in mods:
            if m not in MOSEI_FEATURES:
                raise ValueError(f"data.modalities: MOSEI has {sorted(MOSEI_FEATURES)}, got {m!r}")
            specs.append({"kind": "features", "shape": [seq, MOSEI_FEATURES[m]]})
        return specs
    raise ValueError(f"data.name: unknown dataset {name!r}")
