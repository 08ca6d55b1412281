"""The coverage-guided fuzzer: bytes <-> cases (`codec`), MoE-aware mutation (`mutators`),
semantic coverage features (`features`), and the atheris engine that drives them."""
