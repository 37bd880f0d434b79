"""The research bench: the synthetic world (`world`), the zoo built from it (`zoo`, shipped in
`bundled/`), the paper and CMC benches (`paper`, `cmc`), speed benches (`speed`), the demo and
tiny random model families for tests (`toy`). The engine never imports anything here."""
