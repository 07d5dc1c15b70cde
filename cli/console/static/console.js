// neon console: the few things plain HTML cannot do. Every page works without this file.
"use strict";

// A running job's output, line by line, over server-sent events; the page reloads when it ends.
function followJob() {
  const status = document.getElementById("job-status");
  if (!status || !status.dataset.events) return;
  const output = document.getElementById("job-output");
  output.textContent = "";
  const events = new EventSource(status.dataset.events);
  events.onmessage = (e) => { output.textContent += JSON.parse(e.data) + "\n"; };
  events.addEventListener("progress", (e) => {
    const report = JSON.parse(e.data);
    const bar = document.getElementById("job-progress-bar");
    document.getElementById("job-progress").hidden = false;
    document.getElementById("job-progress-text").textContent = report.text;
    if (report.percent === null) bar.removeAttribute("value");  // no total: indeterminate
    else bar.value = report.percent;
  });
  events.addEventListener("done", () => { events.close(); location.reload(); });
}

// The LSN a PITR slider points at, and the command line that extracts it.
function formatLsn(value) {
  const n = BigInt(value);
  const hex = (x) => x.toString(16).toUpperCase();
  return hex(n >> 32n) + "/" + hex(n & 0xffffffffn).padStart(8, "0");
}

function lsnSliders() {
  for (const form of document.querySelectorAll("form.extract")) {
    const slider = form.querySelector(".lsn-slider");
    const text = form.querySelector(".lsn-text");
    const cmd = form.querySelector("code.cmd");
    const tag = form.querySelector("input[name=tag]");
    const show = () => {
      const lsn = formatLsn(slider.value);
      text.textContent = lsn;
      cmd.textContent = "neon pitr extract-snapshot " + cmd.dataset.area + " --lsn " + lsn +
        (tag.value ? " --as " + tag.value : "");
    };
    slider.addEventListener("input", show);
    tag.addEventListener("input", show);
    show();
  }
}

// The command line of a snapshot-create form, as its tag is typed.
function createForms() {
  for (const cmd of document.querySelectorAll("code.cmd[data-template]")) {
    const tag = cmd.closest("form").querySelector("input[name=tag]");
    tag.addEventListener("input", () => {
      cmd.textContent = cmd.dataset.template.replace("{tag}", tag.value || "TAG");
    });
  }
}

// The command line of an import/push/pull form, from its fields in order: each field's
// data-arg is its flag ("" for a positional argument); a checkbox is its flag alone.
function shellWord(word) {
  return /^[A-Za-z0-9_@%+=:,.\/-]+$/.test(word) ? word : "'" + word.replace(/'/g, "'\"'\"'") + "'";
}

function transferForms() {
  for (const form of document.querySelectorAll("form.transfer-form")) {
    const cmd = form.querySelector("code.cmd");
    const show = () => {
      const words = ["neon", ...form.dataset.command.split(" ")];
      for (const field of form.querySelectorAll("[data-arg]")) {
        const flag = field.dataset.arg;
        if (field.type === "checkbox") {
          if (field.checked) words.push(flag);
          continue;
        }
        const value = field.value.trim() || (field.required ? field.placeholder : "");
        if (!value) continue;
        if (flag) words.push(flag);
        words.push(shellWord(value));
      }
      cmd.textContent = words.join(" ");
    };
    form.addEventListener("input", show);
    form.addEventListener("change", show);
    show();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  followJob(); lsnSliders(); createForms(); transferForms();
});
