// The test page's bundle: yjs and y-webrtc as an application would use them,
// put on window for the tests (tests/test_yjs_browser.py).
import * as Y from 'yjs'
import { WebrtcProvider } from 'y-webrtc'

window.Y = Y
window.WebrtcProvider = WebrtcProvider
