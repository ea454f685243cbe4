// Drives headless Chromium through the search page (run by scripts/browser-check.sh):
// node browser-check.mjs URL SCREENSHOT.png CHROMIUM
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const [url, shot, exe] = process.argv.slice(2);
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
  // nothing may be fetched from anywhere but the server
  const origin = new URL(url).origin;
  page.on("request", (r) => { if (!r.url().startsWith(origin)) errors.push("external request " + r.url()); });
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
  await page.screenshot({ path: shot.replace(/\.png$/, "-like.png"), fullPage: false });

  // a bad request shows the server's message
  const r = await page.evaluate(async () => {
    const x = await fetch("/api/search?q=boats&k=9999");
    return { status: x.status, body: await x.json() };
  });
  if (r.status !== 400 || !r.body.error.includes("from 1 to 500")) fail("bad k: " + JSON.stringify(r));
  if (errors.length) fail(errors.join("; "));
  console.log("browser check passed");
} finally {
  await browser.close();
}
