// Starts `imtrial lsp` (the language server of the imtrial package) for .imtrial files.
const vscode = require('vscode');
const { LanguageClient } = require('vscode-languageclient/node');

let client;

function activate(context) {
  const command = vscode.workspace.getConfiguration().get('imtrial.server.path') || 'imtrial';
  const server = { command, args: ['lsp'] };
  client = new LanguageClient('imtrial', 'imtrial language server', server, {
    documentSelector: [{ scheme: 'file', language: 'imtrial' }],
  });
  context.subscriptions.push(client);
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
