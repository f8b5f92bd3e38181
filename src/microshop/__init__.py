"""The microshop command line."""
