"""Recipes: load (YAML with positions, extends, Jinja sandbox), validate, normalize, hash."""
from recipe_runner.recipe.load import load_recipe, load_recipes
from recipe_runner.recipe.model import Recipe

__all__ = ["Recipe", "load_recipe", "load_recipes"]
