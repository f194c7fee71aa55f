"""Recipe schema and loading (no torch)."""

from midtrain.config.checks import recipe_problems, recipe_warnings
from midtrain.config.load import RecipeError, apply_overrides, dump_recipe, load_recipe
from midtrain.config.recipe import (
    BatchConfig,
    CheckpointConfig,
    ConvertConfig,
    DataConfig,
    EvalConfig,
    OptimizerConfig,
    Recipe,
    ScheduleConfig,
    Source,
    Stage,
    parse_tokens,
)

__all__ = [
    "BatchConfig", "CheckpointConfig", "ConvertConfig", "DataConfig", "EvalConfig", "OptimizerConfig",
    "Recipe", "RecipeError", "ScheduleConfig", "Source", "Stage", "apply_overrides", "dump_recipe", "load_recipe",
    "parse_tokens", "recipe_problems", "recipe_warnings",
]
