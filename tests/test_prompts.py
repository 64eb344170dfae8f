import pytest

from winclip_edge.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, PromptSpec, build_prompts, object_name_for


def test_counts_are_the_papers():
    assert (len(NORMAL_STATES), len(ANOMALOUS_STATES), len(TEMPLATES)) == (7, 4, 22)
    normal, anomalous = build_prompts(PromptSpec("metal nut"))
    assert (len(normal), len(anomalous)) == (154, 88)
    assert len(set(normal)) == 154 and len(set(anomalous)) == 88


def test_exact_wording():
    normal, anomalous = build_prompts(PromptSpec(object_name_for("metal_nut")))
    assert normal[0] == "a cropped photo of the metal nut."
    assert "a cropped photo of a metal nut." in normal  # the template anomalib lacks
    assert "a photo of a flawless metal nut for visual inspection." in normal
    assert "a close-up photo of the metal nut without damage." in normal
    assert "a jpeg corrupted photo of a damaged metal nut." in anomalous
    assert "a photo of the small metal nut with defect." in anomalous
    assert not any("{" in p for p in normal + anomalous)


def test_custom_states_and_templates_are_added_and_checked():
    spec = PromptSpec("cable", extra_normal_states=("clean {o}",), extra_anomalous_states=("{o} with a cut",),
                      extra_templates=("an inspection image of a {c}.",))
    normal, anomalous = build_prompts(spec)
    assert (len(normal), len(anomalous)) == (8 * 23, 5 * 23)
    assert "an inspection image of a clean cable." in normal and "a photo of a cable with a cut." in anomalous
    with pytest.raises(ValueError, match="placeholder"):
        build_prompts(PromptSpec("cable", extra_templates=("no placeholder",)))


def test_baseline_styles():
    assert build_prompts(PromptSpec("bottle", style="clip_ac")) == (["normal bottle"], ["anomalous bottle"])
    normal, anomalous = build_prompts(PromptSpec("bottle", style="templates_only"))
    assert len(normal) == len(anomalous) == 22 and normal[0] == "a cropped photo of the normal bottle."
