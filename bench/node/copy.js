'use strict';
// What a careful Node.js programmer writes today: request -> split2 -> a
// Transform that writes each image file and turns the record into a line of
// COPY text -> pg-copy-streams' COPY FROM STDIN, with stream.pipeline doing the
// backpressure, inside one transaction.
const { Transform } = require('stream');
const { pipeline } = require('stream/promises');
const express = require('express');
const split2 = require('split2');
const { from: copyFrom } = require('pg-copy-streams');
const common = require('./common');

// COPY text format: \N is NULL; backslash, tab, newline and CR are escaped.
function copyField(value) {
  if (value === null || value === undefined) return '\\N';
  return String(value).replace(/[\\\t\n\r]/g,
    (c) => ({ '\\': '\\\\', '\t': '\\t', '\n': '\\n', '\r': '\\r' })[c]);
}

function toCopyRows() {
  let rows = 0;
  const t = new Transform({
    writableObjectMode: true,
    transform(record, _encoding, callback) {
      common.saveImage(record.image).then((image) => {
        rows += 1;
        callback(null, `${copyField(common.nameOf(record))}\t${copyField(record.email)}\t${copyField(image)}\n`);
      }, callback);
    },
  });
  t.count = () => rows;
  return t;
}

const app = express();

app.post('/users', async (req, res) => {
  const client = await common.pool.connect();
  try {
    await client.query('BEGIN');
    const rows = toCopyRows();
    await pipeline(req, split2(common.parseLine), rows,
      client.query(copyFrom('COPY users (name, email, image) FROM STDIN')));
    await client.query('COMMIT');
    res.json({ inserted: rows.count() });
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    console.error(err);
    res.set('Connection', 'close').status(err instanceof SyntaxError ? 400 : 500).json({ error: err.message });
  } finally {
    client.release();
  }
});

common.start('copy', app).catch((err) => { console.error(err); process.exit(1); });
