"""The engine: fusion maths (`fusion`), weight solvers and their exact search (`solvers`, `search`),
decoding (`decoding`: the loop; `context`: each model's tokens and KV cache; `sampling`,
`speculation`, `detokenize`), stacked experts (`stacking`), model and vocabulary loading
(`models`, `vocab`), recipes (`recipe`), size limits (`limits`), the `Fuser` facade (`fuser`) and
every use of other libraries' internals, with the versions checked (`compat`).
Nothing here imports the front ends (cli, serve, eval) or the research bench."""
