"""One colour per method, from the registry, distinct for every registered method."""
from minialign import methods
from minialign.kit import style


def test_every_registered_method_has_its_own_colour_and_name():
    cols = [style.color(n) for n in methods.REGISTRY]
    assert len(set(cols)) == len(cols), dict(zip(methods.REGISTRY, cols))
    assert style.REFERENCE not in cols  # black stays for references and data
    assert all(style.label(n) == methods.REGISTRY[n].label for n in methods.REGISTRY)


def test_other_names_get_a_stable_colour():
    assert style.color("no-grad chain") == style.color("no-grad chain") and style.color("x").startswith("#")
    assert style.label("no-grad chain") == "no-grad chain"
