// Drives headless Chromium through the search page (run by scripts/browser-check.sh):
// node browser-check.mjs URL SCREENSHOT.png CHROMIUM [REPORT.html]
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const [url, shot, exe, report] = process.argv.slice(2);
const fail = (msg) => { console.error("FAIL: " + msg); process.exit(1); };

// thumbnails load lazily: scroll them all into view, wait until each is decoded, scroll back
async function allThumbnails(page) {
  const n = await page.locator("#grid img").count();
  for (let i = 0; i < n; i++) await page.locator("#grid img").nth(i).scrollIntoViewIfNeeded();
  try {
    await page.waitForFunction(() => [...document.querySelectorAll("#grid img")]
      .every((i) => i.complete && i.naturalWidth > 0), null, { timeout: 30000 });
  } catch (e) {
    const state = await page.evaluate(() => [...document.querySelectorAll("#grid img")]
      .filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.src + " " + i.complete));
    fail("thumbnails not loaded: " + state.join(", "));
  }
  await page.evaluate(() => window.scrollTo(0, 0));
}

const browser = await chromium.launch({
  executablePath: exe,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-extensions", "--no-first-run"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  // nothing may be fetched from anywhere but the server, and nothing the page asks for fails
  // (a browser asks for /favicon.ico by itself)
  const origin = new URL(url).origin;
  page.on("request", (r) => { if (!r.url().startsWith(origin)) errors.push("external request " + r.url()); });
  page.on("response", (r) => {
    if (r.status() >= 400 && !r.url().includes("k=9999")) errors.push(r.status() + " for " + r.url());
  });
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("info").textContent.includes("tiles"));
  await page.fill("#q", "a river crossing farmland next to a road");
  await page.selectOption("#k", "20");
  await page.press("#q", "Enter");
  await page.waitForFunction(() => document.querySelectorAll("#grid .tile").length > 0);
  // every thumbnail decoded
  await allThumbnails(page);
  const grid = await page.evaluate(() => [...document.querySelectorAll("#grid .tile")].map((t) => ({
    id: t.dataset.id,
    score: t.querySelector(".score").textContent,
    file: t.querySelector(".file").textContent,
    px: t.querySelector(".px").textContent,
    geo: t.querySelector(".geo") ? t.querySelector(".geo").textContent : null,
    w: t.querySelector("img").naturalWidth,
  })));
  const status = await page.textContent("#status");
  console.log("status: " + status);
  console.log("first results: " + JSON.stringify(grid.slice(0, 3)));
  if (grid.length !== 20) fail("expected 20 tiles, got " + grid.length);
  if (!status.startsWith("20 results")) fail("status: " + status);
  const scores = grid.map((g) => parseFloat(g.score.split("score ")[1]));
  if (scores.some((s, i) => i > 0 && s > scores[i - 1])) fail("scores not descending: " + scores);
  if (!grid.some((g) => g.geo && g.geo.startsWith("EPSG:32633"))) fail("no georeferenced tile shown");
  if (!grid.every((g) => g.w > 0 && /^pixels \d+,\d+ \d+x\d+/.test(g.px))) fail("bad tile captions");
  // boxes as the API gives them, to the millimetre (no 0.1 m rounding)
  const api = await page.evaluate(async () =>
    (await (await fetch("/api/search?q=a+river+crossing+farmland+next+to+a+road&k=20")).json()).results);
  for (const [i, g] of grid.entries()) {
    if (!g.geo) continue;
    const shown = g.geo.split("[")[1].replace("]", "").split(", ").map(Number);
    if (shown.some((v, j) => Math.abs(v - api[i].bbox[j]) > 5e-4)) fail("box shown " + g.geo + " vs " + api[i].bbox);
  }
  await page.screenshot({ path: shot, fullPage: false });

  // more like this: the clicked tile comes back first, with score 1
  const first = grid[3];
  await page.click(`#grid .tile[data-id="${first.id}"]`);
  await page.waitForFunction(() => document.getElementById("status").textContent.includes("results for tiles like"));
  await allThumbnails(page);
  const like = await page.evaluate(() => {
    const t = document.querySelector("#grid .tile");
    return { id: t.dataset.id, score: t.querySelector(".score").textContent };
  });
  console.log("more like " + first.id + ": first " + JSON.stringify(like));
  if (like.id !== first.id || !like.score.includes("score 1.0000")) fail("more like this did not return the tile first");
  if ((await page.inputValue("#q")) !== "") fail("more like this left the old text in the box");
  await page.screenshot({ path: shot.replace(/\.png$/, "-like.png"), fullPage: false });

  // a bad request shows the server's message
  const r = await page.evaluate(async () => {
    const x = await fetch("/api/search?q=boats&k=9999");
    return { status: x.status, body: await x.json() };
  });
  if (r.status !== 400 || !r.body.error.includes("from 1 to 500")) fail("bad k: " + JSON.stringify(r));

  // an empty query clears the old results
  await page.fill("#q", "   ");
  await page.press("#q", "Enter");
  await page.waitForFunction(() => document.getElementById("status").textContent === "type what to look for");
  if ((await page.locator("#grid .tile").count()) !== 0) fail("an empty query left the old results");

  // a phone (390 px): nothing wider than the screen, the button inside it, numbers unbroken
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 }, isMobile: true });
  phone.on("pageerror", (e) => errors.push(String(e)));
  await phone.goto(url);
  await phone.waitForFunction(() => document.getElementById("info").textContent.includes("tiles"));
  await phone.fill("#q", "a river crossing farmland next to a road");
  await phone.press("#q", "Enter");
  await phone.waitForFunction(() => document.querySelectorAll("#grid .tile").length > 0);
  await allThumbnails(phone);
  const layout = await phone.evaluate(() => {
    const b = document.querySelector("form button").getBoundingClientRect();
    const geo = document.querySelector(".geo");
    return {
      scroll: document.documentElement.scrollWidth,
      button: b.right,
      wrap: geo ? getComputedStyle(geo).wordBreak : "normal",
    };
  });
  console.log("at 390 px: " + JSON.stringify(layout));
  if (layout.scroll > 390) fail("the page is " + layout.scroll + " px wide at 390 px");
  if (layout.button > 390) fail("the Search button ends at " + layout.button + " px");
  if (layout.wrap === "break-all") fail("coordinates may break mid-number");
  await phone.screenshot({ path: shot.replace(/\.png$/, "-phone.png"), fullPage: false });
  // a run report at 390 px: wide tables scroll inside themselves, the page does not
  if (report) {
    const r390 = await browser.newPage({ viewport: { width: 390, height: 844 }, isMobile: true });
    await r390.goto("file://" + report);
    const w = await r390.evaluate(() => document.documentElement.scrollWidth);
    console.log("report at 390 px: " + w + " px wide");
    if (w > 390) fail("the report is " + w + " px wide at 390 px");
    await r390.screenshot({ path: shot.replace(/\.png$/, "-report-phone.png"), fullPage: false });
  }
  if (errors.length) fail(errors.join("; "));
  console.log("browser check passed");
} finally {
  await browser.close();
}
