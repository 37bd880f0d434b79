"""The engine: fusion maths (`fusion`), weight solvers and their exact search (`solvers`, `search`),
decoding (`decoding`: the loop; `context`: each model's tokens and KV cache; `sampling`,
`speculation`, `detokenize`), stacked experts (`stacking`), model and vocabulary loading
(`models`, `vocab`), recipes (`recipe`), size limits (`limits`) and the `Fuser` facade (`fuser`).
Nothing here imports the front ends (cli, serve, eval) or the research bench."""
