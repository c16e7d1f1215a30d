import json

from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django_eventstream import send_event


@csrf_exempt
def publish(request):
    payload = json.loads(request.body)
    for _ in range(int(request.GET.get("count", 1))):
        send_event("broadcast", "message", payload)
    return HttpResponse(status=204)
