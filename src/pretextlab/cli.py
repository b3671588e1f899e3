"""The `pretextlab` command."""
import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pretextlab")
    parser.parse_args(argv)
    return 0
