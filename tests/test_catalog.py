"""docs/options.md is the registry's own output, so the documented options are the real ones."""

from pathlib import Path

from fedward import catalog


def test_docs_options_page_is_generated_from_the_registry():
    page = (Path(__file__).parent.parent / "docs" / "options.md").read_text()
    generated = catalog.markdown()
    assert page.endswith(generated), "docs/options.md is stale: regenerate it with `fedward methods --markdown`"


def test_every_registered_method_and_data_set_is_listed():
    from fedward.algorithms import list_methods
    from fedward.data import list_datasets

    text = catalog.text()
    assert all(f"  {name} " in text for name in [*list_methods(), *list_datasets()])
