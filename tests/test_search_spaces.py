"""search_spaces: the block-string grammar, the Architecture value type, the registry and a
contract test that every registered space passes."""

from __future__ import annotations

import json
import re

import optuna
import pytest
import torch

import search_spaces
from nas.hardware import count_mflops, count_params_m
from search_spaces import (
    Architecture,
    BlockSpec,
    EmbeddingHead,
    L2Normalise,
    MobileNetSpace,
    QueryNet,
    SearchSpace,
    TimmQueryNet,
    build,
    count_macs,
    create_space,
    decode_block,
    encode_block,
    list_spaces,
    space_options,
)



# --------------------------------------------------------------------------- block strings

#: (block string, canonical form)
BLOCKS = [
    ("ir_r2_k5_s2_e3_c40_se0.25", "ir_r2_k5_s2_e3_c40_se0.25"),
    ("ir_r1_k3_s1_e1_c16", "ir_r1_k3_s1_e1_c16"),
    ("ir_r3_k7_s2_e6_c96_se0.25_nhs", "ir_r3_k7_s2_e6_c96_se0.25_nhs"),
    ("ir_r1_k3_s1_e2.5_c48_nsw", "ir_r1_k3_s1_e2.5_c48_nsw"),
    ("ir_r1_k3_s1_e6.0_c48", "ir_r1_k3_s1_e6_c48"),
    ("ir_c40_e3_s2_k5_r2", "ir_r2_k5_s2_e3_c40"),
    ("ir_se0.25_c40_nre_e3_s2_k5_r2_noskip", "ir_r2_k5_s2_e3_c40_se0.25_nre_noskip"),
    ("ir_r1_k3_s1_e4_c24_se0.250", "ir_r1_k3_s1_e4_c24_se0.25"),
    ("ir_r1_k3_s1_e4_c024", "ir_r1_k3_s1_e4_c24"),
    ("ir_r1_k3_s1_e4_c24_se0", "ir_r1_k3_s1_e4_c24"),
    ("ds_r1_k3_s1_c16", "ds_r1_k3_s1_c16"),
    ("ds_r1_k3_s1_c16_nre", "ds_r1_k3_s1_c16_nre"),
    ("ds_r1_k3_s1_e1_c16", "ds_r1_k3_s1_c16"),
    ("ds_r2_k5_s2_c32_se0.25_noskip", "ds_r2_k5_s2_c32_se0.25_noskip"),
    ("dsa_r1_k3_s1_c16_nr6", "dsa_r1_k3_s1_c16_nr6"),
    ("er_r1_k3_s2_e4_c24", "er_r1_k3_s2_e4_c24"),
    ("er_r2_k3_s1_e8_c32_se0.25_nmi_noskip", "er_r2_k3_s1_e8_c32_se0.25_nmi_noskip"),
    ("cn_r1_k1_s1_c320", "cn_r1_k1_s1_c320"),
    ("cn_r1_k3_s2_c64_nsw", "cn_r1_k3_s2_c64_nsw"),
    ("cn_noskip_c8_s1_k1_r1", "cn_r1_k1_s1_c8_noskip"),
]


@pytest.mark.parametrize(("text", "canonical"), BLOCKS)
def test_encode_decode_gives_canonical_form(text: str, canonical: str) -> None:
    assert encode_block(decode_block(text)) == canonical


@pytest.mark.parametrize(("text", "canonical"), BLOCKS)
def test_decode_encode_round_trip_preserves_spec(text: str, canonical: str) -> None:
    spec = decode_block(text)
    assert decode_block(encode_block(spec)) == spec
    assert decode_block(canonical) == spec


@pytest.mark.parametrize(("text", "canonical"), BLOCKS)
def test_canonical_form_is_stable(text: str, canonical: str) -> None:
    once = encode_block(decode_block(text))
    assert encode_block(decode_block(once)) == once


def test_decode_fields() -> None:
    spec = decode_block("ir_r2_k5_s2_e3_c40_se0.25_nhs_noskip")
    assert spec == BlockSpec(
        block_type="ir", repeats=2, kernel=5, stride=2, out_chs=40, exp_ratio=3.0, se_ratio=0.25, act="hs", noskip=True
    )
    ds = decode_block("ds_r1_k3_s1_c16")
    assert ds.exp_ratio == 1.0 and ds.se_ratio == 0.0 and ds.act is None and not ds.noskip


@pytest.mark.parametrize("code", sorted(search_spaces._blocks.ACTIVATIONS))
def test_every_activation_code_round_trips(code: str) -> None:
    text = f"ir_r1_k3_s1_e3_c16_n{code}"
    spec = decode_block(text)
    assert spec.act == code
    assert encode_block(spec) == text


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("ir_r2_k5_s2_x3_c40", "x3"),
        ("ir_r2_k5_s2_e3", "'c'"),
        ("ir_r2_k5_s2_c40", "'e'"),
        ("er_r1_k3_s1_c8", "'e'"),
        ("ir_k5_s2_e3_c40", "'r'"),
        ("ir_r2_s2_e3_c40", "'k'"),
        ("ir_r2_k5_e3_c40", "'s'"),
        ("zz_r1_k3_s1_c8", "zz"),
        ("IR_r1_k3_s1_e3_c8", "IR"),
        ("ir_r1_k3_s1_e3_c8_nxx", "nxx"),
        ("ir_r1_k3_s1_e3_c8_skip", "skip"),
        ("ir_r1_r2_k3_s1_e3_c8", "r2"),
        ("ir_r1_k3_s1_e3_e4_c8", "e4"),
        ("ir_r1.5_k3_s1_e3_c8", "1.5"),
        ("ir_r1_k3_s1_e3_c8.5", "8.5"),
        ("ir_r-1_k3_s1_e3_c8", "r-1"),
        ("ir_r1_k3_s1_e3_c8_seX", "seX"),
        ("ir_r1_k3_s1_e3_c8_se", "'se'"),
        ("ir_r1_k3_s1_e3_c8__", "''"),
    ],
)
def test_bad_block_string_names_the_offending_token(text: str, token: str) -> None:
    with pytest.raises(ValueError) as info:
        decode_block(text)
    assert token in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ir_r0_k3_s1_e3_c8", "repeats"),
        ("ir_r1_k4_s1_e3_c8", "kernel"),
        ("ir_r1_k0_s1_e3_c8", "kernel"),
        ("ir_r1_k3_s3_e3_c8", "stride"),
        ("ir_r1_k3_s1_e3_c0", "channels"),
        ("ir_r1_k3_s1_e0_c8", "expansion"),
        ("ds_r1_k3_s1_e3_c8", "e3"),
        ("cn_r1_k3_s1_e2_c8", "e2"),
        ("ir_r1_k3_s1_e3_c8_se1", "Squeeze-excitation"),
        ("ir_r1_k3_s1_e3_c8_se1.5", "Squeeze-excitation"),
    ],
)
def test_out_of_range_block_values_raise_value_error(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        decode_block(text)
    assert fragment in str(info.value)
    assert text in str(info.value)  # the message names the whole block string


@pytest.mark.parametrize("value", ["", None, 3])
def test_decode_block_rejects_non_strings(value: object) -> None:
    with pytest.raises(ValueError):
        decode_block(value)  # type: ignore[arg-type]


def test_block_spec_validates_directly() -> None:
    with pytest.raises(ValueError, match="Block type"):
        BlockSpec("xx", 1, 3, 1, 8)
    with pytest.raises(ValueError, match="Activation code"):
        BlockSpec("ir", 1, 3, 1, 8, exp_ratio=3, act="relu")


@pytest.mark.parametrize("text", ["ir_r1_k3_s1_e3_c8_se0.00001", "ir_r1_k3_s1_e1234567.5_c8"])
def test_canonical_form_of_extreme_floats_decodes(text: str) -> None:
    once = encode_block(decode_block(text))
    assert decode_block(once) == decode_block(text)


def test_round_trip_keeps_float_precision() -> None:
    spec = decode_block("ir_r1_k3_s1_e1.2345678_c8")
    assert decode_block(encode_block(spec)) == spec


def test_repeated_activation_token_is_rejected() -> None:
    with pytest.raises(ValueError, match="nhs"):
        decode_block("ir_r1_k3_s1_e3_c8_nre_nhs")


def test_se_on_conv_bn_act_is_rejected() -> None:
    # timm's ConvBnAct has no squeeze-excitation: a string claiming one must not build silently without it
    with pytest.raises(ValueError, match="se0.25"):
        decode_block("cn_r1_k3_s1_c16_se0.25")


# --------------------------------------------------------------------------- Architecture


def _custom_arch(stages: tuple[tuple[str, ...], ...], **changes: object) -> Architecture:
    fields: dict[str, object] = dict(
        space="custom", resolution=16, width=1.0, stem_chs=16, stages=stages, head_chs=32, embed_dim=8, in_chans=1
    )
    fields.update(changes)
    return Architecture(**fields)  # type: ignore[arg-type]


def _arch(**changes: object) -> Architecture:
    fields: dict[str, object] = dict(
        space="mobilenet",
        resolution=24,
        width=0.5,
        stem_chs=16,
        stages=(("ds_r1_k3_s1_c16_nre",), ("ir_r2_k5_s2_e3_c24_se0.25_nre",), ("ir_r1_k3_s2_e6_c40",)),
        head_chs=256,
        embed_dim=128,
        in_chans=1,
    )
    fields.update(changes)
    return Architecture(**fields)  # type: ignore[arg-type]


def test_architecture_string_form() -> None:
    arch = _arch()
    assert arch.to_string() == (
        "space=mobilenet res=24 width=0.5 stem=16 stages=ds_r1_k3_s1_c16_nre/ir_r2_k5_s2_e3_c24_se0.25_nre/"
        "ir_r1_k3_s2_e6_c40 head=256 embed=128 in=1 act=hard_swish"
    )


def test_architecture_id_is_stable() -> None:
    # The id is stored in Optuna studies and exported model cards: it must not change
    # between versions for the same architecture. Update deliberately, never casually.
    assert _arch().arch_id == "0f67882517ae3df5"
    assert _arch().arch_id == _arch().arch_id
    assert re.fullmatch(r"[0-9a-f]{16}", _arch().arch_id)


def test_architecture_canonicalises_its_block_strings() -> None:
    messy = _arch(stages=(("ds_c16_nre_k3_s1_r1",), ("ir_e3.0_r2_k5_s2_c24_se0.250_nre",), ("ir_r1_k3_s2_e6_c040",)))
    assert messy == _arch()
    assert messy.arch_id == _arch().arch_id
    assert hash(messy) == hash(_arch())
    assert len({messy, _arch()}) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"space": "other"},
        {"resolution": 28},
        {"width": 0.75},
        {"stem_chs": 24},
        {"head_chs": 128},
        {"embed_dim": 64},
        {"in_chans": 3},
        {"act": "relu"},
        {"stages": (("ds_r1_k3_s1_c16_nre",), ("ir_r2_k5_s2_e3_c24_nre",), ("ir_r1_k3_s2_e6_c40",))},
        {"stages": (("ds_r1_k3_s1_c16_nre",), ("ir_r2_k5_s2_e3_c24_se0.25_nre", "ir_r1_k3_s1_e6_c40"))},
        {"stages": (("ds_r1_k3_s1_c16_nre", "ir_r2_k5_s1_e3_c24_se0.25_nre"), ("ir_r1_k3_s2_e6_c40",))},
    ],
)
def test_different_architectures_have_different_ids(change: dict) -> None:
    other = _arch(**change)
    assert other != _arch()
    assert other.arch_id != _arch().arch_id
    assert other.to_string() != _arch().to_string()


@pytest.mark.parametrize(
    "arch",
    [
        _arch(),
        _arch(width=0.35, in_chans=3, act="relu"),
        _arch(width=1.25, resolution=8, embed_dim=2),
        _custom_arch((("er_r1_k3_s2_e4_c24_noskip", "cn_r1_k3_s1_c32"), ("dsa_r1_k5_s2_c40_nr6", "ir_r2_k3_s1_e2.5_c48_nsw_se0.25"))),
    ],
)
def test_architecture_round_trips(arch: Architecture) -> None:
    assert Architecture.from_string(arch.to_string()) == arch
    assert Architecture.from_dict(arch.to_dict()) == arch
    assert Architecture.from_json(arch.to_json()) == arch
    data = json.loads(arch.to_json())
    assert data["arch_id"] == arch.arch_id
    assert data["stages"] == [list(stage) for stage in arch.stages]
    assert Architecture.from_json(arch.to_json()).arch_id == arch.arch_id


def test_from_string_without_act_uses_default() -> None:
    text = _arch().to_string().replace(" act=hard_swish", "")
    assert Architecture.from_string(text) == _arch()


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda s: s.replace(" res=24", ""), "res"),
        (lambda s: s.replace("stem=16 ", ""), "stem"),
        (lambda s: s.replace("embed=128 ", "").replace("head=256 ", ""), "head, embed"),
        (lambda s: s + " junk", "junk"),
        (lambda s: s.replace("res=24", "res=twenty"), "twenty"),
        (lambda s: s.replace("e6_c40", "x6_c40"), "x6"),
        (lambda s: s.replace("res=24", "res=4"), "resolution"),
    ],
)
def test_from_string_errors_name_the_problem(mutate, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        Architecture.from_string(mutate(_arch().to_string()))
    assert fragment in str(info.value)


def test_from_dict_checks_the_id() -> None:
    data = _arch().to_dict()
    data["arch_id"] = "0" * 16
    with pytest.raises(ValueError, match="does not match"):
        Architecture.from_dict(data)
    data.pop("arch_id")
    assert Architecture.from_dict(data) == _arch()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"resolution": 7}, "resolution"),
        ({"width": 0.0}, "width"),
        ({"width": 4.5}, "width"),
        ({"stages": ()}, "stage"),
        ({"stages": (("ds_r1_k3_s1_c16",), ())}, "stage"),
        ({"stages": (("ir_r1_k3_s1_c16",),)}, "'e'"),
        ({"in_chans": 2}, "in_chans"),
        ({"embed_dim": 1}, "embed_dim"),
    ],
)
def test_architecture_validates(change: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        _arch(**change)
    assert fragment in str(info.value)


def test_width_is_kept_exactly_in_string_and_id() -> None:
    a, b = _arch(width=1 / 3), _arch(width=0.3333331)
    assert Architecture.from_string(a.to_string()) == a
    assert a.arch_id != b.arch_id


def test_stride_2_later_in_a_stage_is_rejected() -> None:
    # timm's builder forces stride 1 on every block after a stage's first: such a string would lie
    one_per_stage = _custom_arch((("ds_r1_k3_s1_c16",), ("ir_r1_k3_s2_e3_c24",), ("ir_r1_k3_s2_e3_c32",)), resolution=32)
    with torch.no_grad():
        assert build(one_per_stage).eval().forward_features(torch.zeros(1, 1, 32, 32)).shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match="first block string of a stage"):
        _custom_arch((("ds_r1_k3_s1_c16",), ("ir_r1_k3_s2_e3_c24", "ir_r1_k3_s2_e3_c32")), resolution=32)


def test_build_all_block_types() -> None:
    arch = _custom_arch(
        (
            ("ds_r1_k3_s1_c16_nre",),
            ("er_r1_k3_s2_e4_c24_noskip", "cn_r1_k3_s1_c32"),
            ("dsa_r1_k5_s2_c40_nr6", "ir_r2_k3_s1_e2.5_c48_nsw_se0.25", "ir_r1_k7_s1_e6_c64_nmi"),
        ),
        width=0.5,
        in_chans=3,
    )
    net = build(arch).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 8)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


# --------------------------------------------------------------------------- registry


def test_registry_lists_mobilenet() -> None:
    assert "mobilenet" in list_spaces()
    assert list_spaces() == sorted(list_spaces())
    assert isinstance(create_space("mobilenet", 16, 1), MobileNetSpace)


def test_create_space_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        create_space("mobilenett", 16, 1)
    message = str(info.value)
    assert "'mobilenett'" in message
    assert "Did you mean 'mobilenet'" in message
    for name in list_spaces():
        assert name in message
    with pytest.raises(ValueError, match="Valid spaces"):
        create_space("qqqqqqqq", 16, 1)


def test_create_space_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        create_space("mobilenet", 16, 1, width=[0.5])
    message = str(info.value)
    assert "'width'" in message
    assert "Did you mean 'widths'" in message
    for option in space_options("mobilenet"):
        assert option in message


def test_space_options_of_mobilenet() -> None:
    assert space_options("mobilenet") == [
        "resolutions", "widths", "kernels", "expansions", "depths", "se", "stem_chs", "head_chs",
    ]
    with pytest.raises(ValueError, match="Unknown search space"):
        space_options("nope")


def test_register_space_refuses_a_second_class_under_a_taken_name() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @search_spaces.register_space("mobilenet")
        class Impostor(MobileNetSpace):  # noqa: F841
            pass

    assert search_spaces._registry._SPACES["mobilenet"] is MobileNetSpace


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"resolutions": [8]}, "resolutions"),
        ({"resolutions": []}, "resolutions"),
        ({"resolutions": [16, 16]}, "distinct"),
        ({"resolutions": [16.5]}, "integer"),
        ({"widths": [0, 1]}, "widths"),
        ({"widths": ["a"]}, "number"),
        ({"kernels": [4]}, "kernels"),
        ({"expansions": [0.5]}, "expansions"),
        ({"depths": [[1], [1], [1]]}, "depths"),
        ({"depths": [[0], [1], [1], [1]]}, "depths"),
        ({"se": [True, True]}, "se"),
        ({"se": []}, "se"),
        ({"stem_chs": 4}, "stem_chs"),
    ],
)
def test_mobilenet_options_are_validated(options: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        create_space("mobilenet", 16, 1, **options)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("embed_dim", "in_chans"), [(1, 1), (16, 2)])
def test_space_validates_embed_dim_and_channels(embed_dim: int, in_chans: int) -> None:
    with pytest.raises(ValueError):
        create_space("mobilenet", embed_dim, in_chans)


# --------------------------------------------------------------------------- Optuna parameters


MOBILENET_PARAMS = {
    "resolution",
    "width",
    *(f"s{i}_{name}" for i in range(1, 5) for name in ("depth", "kernel", "expansion", "se")),
}


def _ask(study: optuna.Study, space: SearchSpace) -> tuple[optuna.trial.Trial, Architecture]:
    trial = study.ask()
    return trial, space.sample(trial)


def test_mobilenet_parameter_names_are_stable() -> None:
    space = create_space("mobilenet", 16, 1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        trial, _arch_ = _ask(study, space)
        assert set(trial.params) == MOBILENET_PARAMS


def test_mobilenet_sample_follows_the_choices() -> None:
    space = create_space("mobilenet", 16, 3, resolutions=[16, 20], widths=[0.5], kernels=[5], expansions=[4], se=[True])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(4):
        trial, arch = _ask(study, space)
        assert arch.resolution in (16, 20)
        assert arch.width == 0.5
        assert arch.in_chans == 3 and arch.embed_dim == 16
        for stage in arch.stages[1:]:
            spec = decode_block(stage[0])
            assert spec.kernel == 5 and spec.exp_ratio == 4.0 and spec.se_ratio == 0.25
        assert decode_block(arch.stages[0][0]).block_type == "ds"


def test_mobilenet_make_and_extreme() -> None:
    space = create_space("mobilenet", 16, 1)
    small = space.extreme(smallest=True)
    assert small.resolution == 20 and small.width == 0.35
    assert space.extreme(smallest=True, resolution=32).resolution == 32
    large = space.extreme(smallest=False)
    assert large.resolution == 32 and large.width == 1.0
    assert [decode_block(s[0]).repeats for s in large.stages[1:]] == [2, 3, 2, 3]
    made = space.make(20, 0.35, [(1, 3, 3.0, False)] * 4)
    assert made == small
    with pytest.raises(ValueError):
        space.make(20, 0.35, [(1, 3, 3.0, False)] * 3)


def test_mobilenet_describe_counts_architectures() -> None:
    space = create_space("mobilenet", 16, 1, resolutions=[16, 20], widths=[0.5], kernels=[3, 5], expansions=[3], se=[False],
                         depths=[[1], [1, 2], [1], [1]])
    info = space.describe()
    assert info["num_architectures"] == 2 * 1 * (2 * 1 * 1) * (2 * 2 * 1 * 1) * 2 * 2
    assert json.loads(json.dumps(info)) == info


# --------------------------------------------------------------------------- contract: every space


@pytest.fixture(scope="module", params=list_spaces())
def space_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("in_chans", [1, 3])
def test_space_contract_sample_build_forward(space_name: str, in_chans: int) -> None:
    embed_dim = 12
    space = create_space(space_name, embed_dim, in_chans)
    assert space.name == space_name
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=in_chans))
    torch.manual_seed(0)
    for _ in range(5):
        trial, arch = _ask(study, space)
        assert isinstance(arch, Architecture)
        assert arch.space == space_name
        assert arch.embed_dim == embed_dim and arch.in_chans == in_chans
        # the same parameters give the same architecture
        assert space.sample(optuna.trial.FixedTrial(trial.params)) == arch
        assert Architecture.from_string(arch.to_string()) == arch
        assert Architecture.from_json(arch.to_json()) == arch
        assert Architecture.from_string(arch.to_string()).arch_id == arch.arch_id
        net = build(arch)
        assert isinstance(net, (QueryNet, TimmQueryNet))
        net.eval()
        x = torch.randn(3, in_chans, arch.resolution, arch.resolution)
        with torch.no_grad():
            out = net(x)
            features = net.forward_features(x)
            pooled = net.forward_head(features, pre_logits=True)
            head = net.forward_head(features)
        assert out.shape == (3, embed_dim)
        assert torch.isfinite(out).all()
        assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
        assert features.ndim == 4 and features.shape[0] == 3
        assert pooled.shape == (3, net.num_features)  # MobileNetV3's head conv comes after pooling
        assert torch.allclose(head, out, atol=1e-6)
        # the pieces (what the latency lookup table times) compose to the whole net
        chained = x
        with torch.no_grad():
            for piece in net.pieces():
                chained = piece(chained)
        assert torch.allclose(chained, out, atol=1e-5)
        study.tell(trial, 0.0)


def test_space_contract_smallest_member_is_smallest(space_name: str) -> None:
    space = create_space(space_name, 16, 1)
    smallest = count_macs(space.extreme(smallest=True))
    largest = count_macs(space.extreme(smallest=False))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(8):
        trial, arch = _ask(study, space)
        assert smallest <= count_macs(arch) <= largest
        study.tell(trial, 0.0)


def test_space_contract_extremes_and_describe(space_name: str) -> None:
    space = create_space(space_name, 16, 1)
    small, large = space.extreme(smallest=True), space.extreme(smallest=False)
    assert small != large
    assert small.arch_id != large.arch_id
    small_net, large_net = build(small), build(large)
    assert count_mflops(small_net, small.resolution, 1) < count_mflops(large_net, large.resolution, 1)
    assert count_params_m(small_net) < count_params_m(large_net)
    info = space.describe()
    assert info["num_architectures"] > 1
    assert isinstance(info["num_architectures"], int)


def test_space_contract_training_step_runs(space_name: str) -> None:
    space = create_space(space_name, 8, 1)
    arch = space.extreme(smallest=True)
    net = build(arch).train()
    out = net(torch.randn(4, 1, arch.resolution, arch.resolution))
    out.sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


# --------------------------------------------------------------------- ResNet blocks, spaces


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("bb_r1_k5_s1_c16", "k5"),
        ("bt_r1_k3_s1_c18", "c18"),
        ("bb_r1_k3_s1_c16_se0.25", "se0.25"),
        ("bb_r1_k3_s1_e4_c16", "e4"),
        ("bt_r1_k3_s1_c16_noskip", "noskip"),
    ],
)
def test_resnet_block_strings_name_the_impossible_token(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        decode_block(text)


def test_resnet_block_round_trips_and_builds_timm_blocks() -> None:
    from timm.models.resnet import BasicBlock, Bottleneck

    assert encode_block(decode_block("bt_c64_s2_k3_r2")) == "bt_r2_k3_s2_c64"
    arch = Architecture("resnet", 24, 1.0, 16, (("bb_r2_k3_s1_c16",), ("bt_r1_k3_s2_c64",)), 0, 8, 1, act="relu")
    net = build(arch)
    kinds = [type(b) for stage in net.blocks for b in stage]
    assert kinds == [BasicBlock, BasicBlock, Bottleneck]
    assert net.num_features == 64 and isinstance(net.conv_head, torch.nn.Identity)
    assert net.blocks[1][0].conv2.out_channels == 16  # bottleneck middle width: a quarter of c64
    assert net(torch.randn(2, 1, 24, 24)).shape == (2, 8)


def test_architecture_refuses_resnet_and_mobilenet_blocks_together() -> None:
    with pytest.raises(ValueError, match="either ResNet blocks"):
        Architecture("x", 24, 1.0, 16, (("bb_r1_k3_s1_c16",), ("ir_r1_k3_s2_e3_c24",)), 0, 8, 1)


def test_resnet_space_make_and_channels() -> None:
    space = create_space("resnet", 8, 1)
    basic = space.make(24, "basic", [(1, 0.25), (2, 0.25), (1, 0.5), (1, 0.125)])
    assert basic.stages == (("bb_r1_k3_s1_c16",), ("bb_r2_k3_s2_c32",), ("bb_r1_k3_s2_c128",), ("bb_r1_k3_s2_c64",))
    bottleneck = space.make(24, "bottleneck", [(1, 0.25), (1, 0.25), (1, 0.25), (1, 0.25)])
    assert [s[0].split("_")[-1] for s in bottleneck.stages] == ["c64", "c128", "c256", "c512"]
    with pytest.raises(ValueError, match="'wide'"):
        space.make(24, "wide", [(1, 0.25)] * 4)
    assert space.describe()["num_architectures"] == 4 * 2 * (2 * 3) * (2 * 3) * (3 * 3) * (2 * 3)


def test_efficientnet_space_scales_depth_like_efficientnet() -> None:
    space = create_space("efficientnet", 8, 1)
    assert [space.repeats(b, 0.5) for b in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert [space.repeats(b, 1.0) for b in (1, 2, 3, 4)] == [1, 2, 3, 4]
    arch = space.make(24, 0.5, 0.5, [(5, 6, True)] * 6)
    assert arch.act == "swish"
    assert arch.stages[1] == ("ir_r1_k5_s2_e6_c24_se0.25",)
    net = build(arch)
    from timm.models._efficientnet_blocks import SqueezeExcite

    se = next(m for m in net.modules() if isinstance(m, SqueezeExcite))
    assert type(se.gate).__name__ == "Sigmoid"  # EfficientNet's gate, not MobileNetV3's hard-sigmoid


def test_timm_architecture_string_round_trip_and_width() -> None:
    arch = search_spaces.timm_architecture("resnet18", 32, 8, 1, width=0.5)
    assert arch.to_string() == "space=timm res=32 width=0.5 model=resnet18 embed=8 in=1"
    assert Architecture.from_string(arch.to_string()) == arch
    assert Architecture.from_json(arch.to_json()) == arch
    net = build(arch)
    assert net.model.layer1[0].conv1.out_channels == 32  # 64 x 0.5
    with pytest.raises(ValueError, match="fixed width"):
        build(search_spaces.timm_architecture("mobilenetv3_small_050", 32, 8, 1, width=0.75))
    with pytest.raises(ValueError, match="no model named 'mobilenetv9'"):
        build(search_spaces.timm_architecture("mobilenetv9", 32, 8, 1))
    with pytest.raises(ValueError, match="stages must be empty"):
        Architecture("timm", 32, 1.0, 16, (("ir_r1_k3_s1_e3_c16",),), 0, 8, 1, timm_model="resnet18")


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"families": ["mobilenetv4"]}, "mobilenetv4"),
        ({"families": []}, "at least one family"),
        ({"resolutions": [16]}, ">= 32"),
        ({"widths": {"lcnet": [0.6]}}, "0.6"),
        ({"families": ["lcnet"], "widths": {"resnet": [0.5]}}, "'resnet'"),
    ],
)
def test_timm_zoo_options_are_validated(options: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        create_space("timm_zoo", 8, 1, **options)


def test_timm_zoo_samples_registered_variants() -> None:
    space = create_space("timm_zoo", 8, 1, families=["lcnet", "resnet"], resolutions=[32], widths={"lcnet": [0.35, 0.5]})
    assert space.describe()["num_architectures"] == 2 + 4
    assert space.extreme(smallest=True).timm_model == "lcnet_035"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial, arch = _ask(study, space)
        seen.add(arch.timm_model)
        assert f"width_{trial.params['family']}" in trial.params
        study.tell(trial, 0.0)
    assert seen <= {"lcnet_035", "lcnet_050", "resnet18"} and "resnet18" in seen


def test_timm_model_exists_is_public() -> None:
    assert search_spaces.timm_model_exists("resnet18")
    assert not search_spaces.timm_model_exists("mobilenetv9")


# --------------------------------------------------------------------------- the one embedding head


def test_embedding_head_is_a_linear_layer_that_normalises() -> None:
    torch.manual_seed(0)
    head = EmbeddingHead(6, 4)
    assert isinstance(head, torch.nn.Linear)
    assert list(head.state_dict()) == ["weight", "bias"]  # what an nn.Linear stores: checkpoints load
    x = torch.randn(5, 6)
    out = head(x)
    assert torch.allclose(out, torch.nn.functional.normalize(x @ head.weight.t() + head.bias, dim=1))
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-6)
    assert list(L2Normalise().state_dict()) == []
    assert torch.equal(L2Normalise()(x), torch.nn.functional.normalize(x, dim=1))


@pytest.mark.parametrize("space_name", ["mobilenet", "resnet", "timm_zoo"])
def test_every_net_ends_with_the_embedding_head(space_name: str) -> None:
    space = create_space(space_name, 8, 1, **({"resolutions": [32], "families": ["lcnet"]} if space_name == "timm_zoo" else {}))
    net = build(space.extreme(smallest=True)).eval()
    assert isinstance(net.embed, EmbeddingHead)
    assert {"embed.weight", "embed.bias"} <= set(net.state_dict())
    assert net.pieces()[-1].embed is net.embed  # the latency table's head piece is the same layer
    x = torch.randn(2, 1, net.arch.resolution, net.arch.resolution)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(net)(x), net(x), atol=1e-6)
