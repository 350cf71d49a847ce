"""Sample model recipes: ``python -m models`` builds signed bundles into models/build/.

See models/recipe.py for the recipe interface and the build layout.
"""
