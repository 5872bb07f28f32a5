// node-process-pool's own README example, as the benchmark runs it:
// TASKS tasks of [i], MAX_PARALLEL processes, each task printing its params.
const ProcessPool = require('node-process-pool')
const tasks = parseInt(process.argv[2] || '5000')
const taskParams = []
for (let i = 0; i < tasks; i++) taskParams[i] = [i]
const processPool = new ProcessPool({
  maxParallelProcess: parseInt(process.argv[3] || '50'),
  timeToClose: 60 * 1000,
  dependency: `const path = require('path')`,
  workDir: __dirname,
  taskName: 'test',
  script: async function task(taskParams) { console.log(taskParams) },
  taskParams
})
processPool.run()
