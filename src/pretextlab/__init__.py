"""pretextlab: the study "Revisiting Self-Supervised Visual Representation Learning" as a toolkit."""

__version__ = "0.1.0"
