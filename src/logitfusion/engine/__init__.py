"""The engine: fusion maths (`fusion`), weight solvers, their registry and exact search (`solvers`,
`registry`, `search`), the decoding loop and what it is made of (`decoding`, `context`, `sampling`,
`speculation`, `detokenize`), stacked experts (`stacking`), the models by kind (`members`: large,
small, experts and delta, and the logits a solver gets), model and vocabulary loading (`models`,
`vocab`), recipes (`recipe`), generate's jobs (`jobs`), size limits (`limits`), other libraries'
internals (`compat`) and the `Fuser` facade (`fuser`). Nothing here imports the front ends (cli,
serve, eval), training or the research bench (tests/test_layout.py checks it)."""
