"""The YAML recipes of ``lightning-brn``, shipped as package data (installed as ``lightning_brn.recipes``).

Run one by name with ``lightning-brn fit --recipe NAME``; list them with ``lightning-brn --help`` or
:func:`lightning_brn.cli.available_recipes`, and find a file with :func:`lightning_brn.cli.recipe_path`.
See ``docs/recipes.md`` for what each recipe reproduces.

Examples::

    >>> from importlib import resources
    >>> resources.files("lightning_brn.recipes").joinpath("default.yaml").is_file()
    True
"""
